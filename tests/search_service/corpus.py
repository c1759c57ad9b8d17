"""A shared fixture corpus for the search contract tests, and a reference model of the answers.

The reference computes, in plain Python, what every backend must return for a query: which
documents, in which order, the total and the per-class counts. Both backends are compared
against it (and against each other), so "same answers" is checked, not assumed.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from imagemesh.common.v1 import common_pb2
from imagemesh.search.v1 import search_pb2

CLASSES = ["cat", "dog", "bird", "car", "tree"]
V1 = "models/densenet/versions/v1"
V3 = "models/densenet/versions/v3"
BASE_S = 1_700_000_000


def f32(x: float) -> float:
    """The value a proto `float` field holds for `x`."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def name_of(key: str) -> str:
    return "images/" + hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Doc:
    name: str
    filename: str
    dataset: str
    label: str
    tags: list[str]
    attributes: dict[str, str]
    size_bytes: int
    create_ns: int
    predictions: dict[str, tuple[str, float]] = field(default_factory=dict)

    def proto(self) -> search_pb2.ImageDocument:
        seconds, nanos = divmod(self.create_ns, 1_000_000_000)
        return search_pb2.ImageDocument(
            name=self.name,
            filename=self.filename,
            dataset=self.dataset,
            label=self.label,
            tags=self.tags,
            attributes=self.attributes,
            content_type="image/png",
            size_bytes=self.size_bytes,
            width=32,
            height=32,
            create_time=Timestamp(seconds=seconds, nanos=nanos),
        )

    def prediction_protos(self) -> list[search_pb2.ImagePrediction]:
        return [
            search_pb2.ImagePrediction(
                image=self.name,
                prediction=common_pb2.Prediction(
                    model_version=version,
                    top_class=cls,
                    confidence=conf,
                    top_classes=[
                        common_pb2.ClassScore(
                            class_name=cls, class_index=CLASSES.index(cls), probability=conf
                        )
                    ],
                    predict_time=Timestamp(seconds=BASE_S + 5000),
                    probabilities_array=f"arrays/predictions/{self.name[7:15]}.npy",
                ),
            )
            for version, (cls, conf) in self.predictions.items()
        ]


def build_corpus(count: int = 36) -> list[Doc]:
    docs: list[Doc] = []
    for i in range(count):
        kind = CLASSES[i % 5]
        tags = []
        if i % 2:
            tags.append("outdoor")
        if i % 3 == 0:
            tags.append("night shot")
        doc = Doc(
            name=name_of(f"corpus-{i}"),
            filename=f"{kind}_{i:03d}.png" if i % 4 else f"IMG {i:03d} {kind.upper()}.jpg",
            dataset=["train", "val", "test"][i % 3],
            label="" if i % 7 == 0 else CLASSES[(i * 3) % 5],
            tags=tags,
            attributes={"camera": "a" if i % 2 else "b"} | ({"lens": "wide"} if i % 4 == 0 else {}),
            # Repeats on purpose: ties must be broken by name, the same way on every backend.
            size_bytes=1000 + (i * 37) % 5 * 100,
            create_ns=(BASE_S + (i % 9) * 60) * 1_000_000_000 + (i % 2) * 123_456_789,
        )
        if i % 6 != 5:
            doc.predictions[V1] = (CLASSES[(i + 1) % 5], f32(((i * 13) % 100) / 100))
        if i % 2 == 0:
            doc.predictions[V3] = (CLASSES[(i + 2) % 5], f32(((i * 7) % 100) / 100))
        docs.append(doc)
    # The trap for "conditions on the same prediction": v1 says cat at 0.95, v3 says cat at 0.5.
    docs[1].predictions = {V1: ("cat", f32(0.95)), V3: ("cat", f32(0.5))}
    # Words that look like query syntax or other fields live in no filename, except here.
    docs[2].filename = "label cat.png"
    docs[2].label = "dog"
    return docs


# -- the reference model -------------------------------------------------------------------


def words(text: str) -> set[str]:
    import re

    return {w.lower() for w in re.findall(r"[^\W_]+", text)}


def matches(doc: Doc, flt: search_pb2.ImageFilter, text: str) -> bool:
    if flt.datasets and doc.dataset not in flt.datasets:
        return False
    if flt.labels and doc.label not in flt.labels:
        return False
    if any(t not in doc.tags for t in flt.tags):
        return False
    if any(doc.attributes.get(k) != v for k, v in flt.attributes.items()):
        return False
    if flt.names and doc.name not in flt.names:
        return False
    if flt.HasField("create_time"):
        rng = flt.create_time
        if rng.HasField("start_time") and doc.create_ns < rng.start_time.ToNanoseconds():
            return False
        if rng.HasField("end_time") and doc.create_ns > rng.end_time.ToNanoseconds():
            return False
    if flt.HasField("prediction") and not matching_predictions(doc, flt):
        return False
    if text.strip():
        terms = words(text)
        have = words(doc.filename) | set().union(*(words(t) for t in doc.tags))
        if not terms or not terms <= have:
            return False
    return True


def matching_predictions(doc: Doc, flt: search_pb2.ImageFilter) -> list[str]:
    """The top classes of the doc's predictions that match the filter's prediction part."""
    out = []
    p = flt.prediction
    for version, (cls, conf) in doc.predictions.items():
        if p.model_version and version != p.model_version:
            continue
        if p.classes and cls not in p.classes:
            continue
        if p.HasField("min_confidence") and conf < p.min_confidence:
            continue
        if p.HasField("max_confidence") and conf > p.max_confidence:
            continue
        out.append(cls)
    return out


_FIELDS = {
    "create_time": lambda d, _: d.create_ns,
    "filename": lambda d, _: d.filename,
    "size_bytes": lambda d, _: d.size_bytes,
    "dataset": lambda d, _: d.dataset,
    "label": lambda d, _: d.label,
    "confidence": lambda d, mv: d.predictions[mv][1],
}


def expected(
    docs: list[Doc],
    flt: search_pb2.ImageFilter | None = None,
    text: str = "",
    order_by: str = "",
    count_by: int = 0,
) -> tuple[list[str], list[tuple[str, int]]]:
    """(names in order, counts) that every backend must answer."""
    flt = flt or search_pb2.ImageFilter()
    found = [d for d in docs if matches(d, flt, text)]
    keys = []
    for part in (order_by or "create_time desc").split(","):
        tokens = part.split()
        keys.append((tokens[0], len(tokens) > 1 and tokens[1] == "desc"))
    found.sort(key=lambda d: d.name)
    mv = flt.prediction.model_version
    for field_name, desc in reversed(keys):  # stable sorts, least significant first
        found.sort(key=lambda d, f=field_name: _FIELDS[f](d, mv), reverse=desc)
    counts: dict[str, int] = {}
    for d in found:
        if count_by == search_pb2.COUNT_FIELD_LABEL:
            values = {d.label} - {""}
        elif count_by == search_pb2.COUNT_FIELD_DATASET:
            values = {d.dataset}
        elif count_by == search_pb2.COUNT_FIELD_PREDICTED_CLASS:
            values = (
                set(matching_predictions(d, flt))
                if flt.HasField("prediction")
                else {c for c, _ in d.predictions.values()}
            )
        else:
            values = set()
        for v in values:
            counts[v] = counts.get(v, 0) + 1
    return [d.name for d in found], sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
