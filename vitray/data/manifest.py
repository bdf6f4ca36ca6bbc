"""What a dataset is made of, whatever its format: the manifest (`manifest.json`), its shard entries, a sample as
the writers hand it over, and the one error type bad data raises.

Layout of a dataset folder:
    manifest.json          written last: a dataset without it does not exist yet
    shard-00000.tar        members `<key>.jpg|png` (the original encoded bytes) and `<key>.cls` (label, ASCII int),
                           or for detection `<key>.json` (boxes and categories, see `vitray.data.detection`)
    shard-00001.tar ...

Shards other tools wrote (img2dataset, timm) get a manifest in place from `jobs/write_shards.py --index`
(`vitray/data/index.py`): their own names (`00000.tar`), labels where they keep them (the manifest's "labels",
`vitray/data/labels.py`), and no sha256 unless asked for (the size is checked instead). A Parquet folder's manifest
lists row groups instead of tar files (`vitray/data/parquet.py`).

These types sit below every other module of vitray/data: the tar code (`shards.py`), the Parquet code, the label
rules and the decoders all use them, and none of them needs to know how a manifest is found (`catalog.py`).
"""
from __future__ import annotations

import dataclasses
import json

MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """Bad input data; the message names the file, shard or sample key."""


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str  # unique within the dataset; no dots (WebDataset splits member names at the first dot)
    image: bytes  # encoded JPEG or PNG
    ext: str  # "jpg" or "png"
    label: int | None  # classification: the class index; detection: None (the annotation holds the categories)
    annotation: bytes | None = None  # detection: JSON {"boxes": [[x, y, w, h], ...], "labels": [...]}


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    classes: list[str]
    shards: list[ShardInfo]
    format: str = "webdataset"
    version: int = 1
    task: str = "classification"  # or "detection": samples carry a .json annotation instead of a .cls label
    skipped: list[dict] = dataclasses.field(default_factory=list)  # writer's --skip-bad: {"path", "reason"} each
    # Where each sample's class comes from (`vitray/data/labels.py`): "cls" (vitray's writer), "txt" or
    # "json:FIELD" (existing WebDataset shards indexed by `jobs/write_shards.py --index`), "column" (Parquet).
    labels: str = "cls"
    columns: dict = dataclasses.field(default_factory=dict)  # Parquet: {"image": column, "label": column}
    prefix: str = ""  # Parquet named by a file-name prefix (the Hub's data/train-*): the files are beside the URI

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["num_samples"] = self.num_samples
        return json.dumps(d, indent=1)

    @staticmethod
    def from_json(text: str) -> "Manifest":
        d = json.loads(text)
        return Manifest(classes=d["classes"], shards=[ShardInfo(**s) for s in d["shards"]], format=d["format"],
                        version=d["version"], task=d.get("task", "classification"), skipped=d.get("skipped", []),
                        labels=d.get("labels", "cls"), columns=d.get("columns", {}), prefix=d.get("prefix", ""))
