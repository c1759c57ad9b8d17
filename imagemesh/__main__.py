"""`python -m imagemesh` is the `imagemesh` command."""

from imagemesh.cli import entrypoint

entrypoint()
