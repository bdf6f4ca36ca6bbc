"""Where a sample's class comes from, and how its text becomes a class index.

vitray's own shards hold `<key>.cls` (an ASCII integer). Existing WebDataset datasets name their classes in other
ways, and the manifest records which (`"labels"`), so that indexing and every read of the data agree:

    cls          `<key>.cls`: an integer (timm's reader_wds, vitray's writer)
    txt          `<key>.txt`: a class name, one of the manifest's classes (a folder name, a synset)
    json:FIELD   `<key>.json`: FIELD of the JSON object, an integer or a class name (img2dataset's metadata)
    column       Parquet: the label column's integer (its name is in the manifest's "columns")
"""
from __future__ import annotations

import json

from vitray.data.manifest import DataError

SOURCES = ("cls", "txt", "json:FIELD", "column")


def check_source(source: str, where: str = "--labels") -> str:
    """`source` if it is one of SOURCES, else a DataError saying what is."""
    if source in ("cls", "txt", "column") or (source.startswith("json:") and len(source) > len("json:")):
        return source
    raise DataError(f"{where}: {source!r} is not a label source (cls, txt or json:FIELD)")


def member(source: str) -> str:
    """The tar member extension that holds the label: cls, txt or json."""
    return source.split(":", 1)[0]


def needs_names(source: str) -> bool:
    """Whether the labels are class names, which only the user's class list can turn into indices."""
    return source == "txt"


def label_index(value: str | int | None, source: str, classes: dict[str, int] | None, num_classes: int,
                where: str) -> int:
    """The class index of one sample's label `value` (the label member's text, or a Parquet integer).
    `classes`: class name → index, for sources whose labels are names; `num_classes` 0 = no range check (indexing,
    before the classes are known). Raises a DataError naming `where` and what is wrong."""
    if value is None:
        raise DataError(f"{where}: missing label (.{member(source)})" if source != "column" else f"{where}: missing label")
    if source.startswith("json:"):
        field = source[len("json:"):]
        try:
            record = json.loads(value)
        except ValueError as e:
            raise DataError(f"{where}: .json is not JSON ({e})") from e
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{where}: .json has no field {field!r} (--labels json:{field})")
        value = record[field]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{where}: .json field {field!r} is {value!r}, neither a class index nor a class name")
    if isinstance(value, str) and (source == "txt" or (source.startswith("json:") and not _is_int(value))):
        name = value.strip()
        if classes is None:
            raise DataError(f"{where}: label {name!r} is a class name; give the class list (--classes FILE)")
        if name not in classes:
            raise DataError(f"{where}: label {name!r} is not one of the {len(classes)} classes of the manifest")
        return classes[name]
    if isinstance(value, str):
        if not _is_int(value):
            raise DataError(f"{where}: label {value!r} is not an integer")
        value = int(value)
    if value < 0 or (num_classes and value >= num_classes):
        raise DataError(f"{where}: label {value} outside the {num_classes or 'non-negative'} classes")
    return int(value)


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def class_map(source: str, classes: list[str] | tuple[str, ...]) -> dict[str, int] | None:
    """name → index for the sources whose labels may be names; None for integer-only sources."""
    return {name: i for i, name in enumerate(classes)} if source == "txt" or source.startswith("json:") else None
