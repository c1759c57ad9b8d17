"""The classifier: a DenseNet121 backbone and a Dense softmax head, and its stored artifacts.

`densenet` builds the networks; `artifact` describes a published version (its metadata);
`registry` publishes and loads versions in the object store under
`models/{model}/versions/{version}/`.
"""
