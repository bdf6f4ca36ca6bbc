"""Parquet datasets as they are (Hugging Face Hub layout): a folder of `*.parquet` files with an image column
(a struct {bytes, path}, or plain binary) and an integer label column.

Row groups play the part of tar shards: the unit list (file, row group, rows) comes from the files' footers —
once, by `jobs/write_shards.py --index` (a manifest with format "parquet"), or, when the folder has no manifest,
by whoever reads it (a few small reads per file). Each unit is a `ShardInfo` named `<file>#<row group>` whose
`bytes` is its file's size, so the same seeded deal to partitions (`partition_shards`), exact-once epochs and
resume positions apply unchanged. Ray Data's own Parquet reader is not used: it cannot be told which row groups
a partition owns. A decode task reads its row group with pyarrow and decodes it like a shard's samples.

Classes: the Hub's ClassLabel names when the file's metadata has them, else 0..max of the label column (from the
footers' statistics where present). A missing column or a non-integer label column is one error naming the file
and the column, raised before any Ray resource is asked for.
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from vitray import storage
from vitray.data.manifest import DataError, Manifest, ShardInfo
from vitray.storage import Endpoint


def scan(uri: str, endpoint: Endpoint | None, image_column: str = "image", label_column: str = "label",
         field: str = "data.train_uri", prefix: str = "") -> Manifest:
    """The manifest of the Parquet files directly under `uri` (those whose names start with `prefix`), from their
    footers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [n for n in storage.list_files(uri, endpoint) if n.endswith(".parquet") and n.startswith(prefix)]
    if not files:
        raise DataError(f"{field}: {storage.join(uri, prefix) if prefix else uri} holds no .parquet files")
    fs, root = storage.resolve(uri, endpoint)
    units: list[ShardInfo] = []
    top, names = -1, None
    for name in files:
        where = f"{field}: {storage.join(uri, name)}"
        try:
            with fs.open_input_file(f"{root}/{name}") as f:
                meta = pq.ParquetFile(f).metadata
                size = f.size()
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{where}: not a readable Parquet file ({e})") from e
        for column in (image_column, label_column):
            if column not in schema.names:
                raise DataError(f"{where}: no column {column!r} (columns: {', '.join(schema.names)}); name the right"
                                " one with data.image_column / data.label_column")
        image_type, label_type = schema.field(image_column).type, schema.field(label_column).type
        if not (_is_binary(image_type) or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
            raise DataError(f"{where}: column {image_column!r} is {image_type}, not image bytes (binary, or a struct"
                            " with a 'bytes' field as the Hub writes)")
        if not pa.types.is_integer(label_type):
            raise DataError(f"{where}: column {label_column!r} is {label_type}, not integer class indices")
        names = names or _hub_class_names(schema, label_column)
        # Statistics are per leaf column (a struct has one leaf per field), so find the label's leaf by its path.
        column_index = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == label_column)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if group.num_rows:
                units.append(ShardInfo(f"{name}#{g}", group.num_rows, "", size))
                top = max(top, _max_label(fs, f"{root}/{name}", g, group, column_index, label_column, where))
    if not units:
        raise DataError(f"{field}: {uri} holds no samples")
    if names is not None and top >= len(names):
        raise DataError(f"{field}: {uri}: label {top} in column {label_column!r} is outside its {len(names)} class names")
    classes = names or [str(i) for i in range(top + 1)]
    return Manifest(classes=classes, shards=units, format="parquet", labels="column",
                    columns={"image": image_column, "label": label_column}, prefix=prefix)


def _is_binary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _hub_class_names(schema, label_column: str) -> list[str] | None:
    """The ClassLabel names the Hugging Face `datasets` library stores in the file's schema metadata, if any."""
    try:
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        feature = info.get("info", {}).get("features", {}).get(label_column, {})
        return list(feature["names"]) if feature.get("_type") == "ClassLabel" else None
    except (ValueError, AttributeError, KeyError, TypeError):
        return None


def _max_label(fs, path: str, g: int, group, column_index: int, label_column: str, where: str) -> int:
    """The largest label of a row group: from the footer's statistics, else by reading that one column."""
    import pyarrow.parquet as pq

    stats = group.column(column_index).statistics
    if stats is not None and stats.has_min_max:
        low, high = int(stats.min), int(stats.max)
    else:
        with fs.open_input_file(path) as f:
            values = pq.ParquetFile(f).read_row_group(g, columns=[label_column]).column(0).drop_null().to_numpy()
        low, high = (int(values.min()), int(values.max())) if len(values) else (0, -1)
    if low < 0:
        raise DataError(f"{where}: column {label_column!r} holds the negative label {low} (row group {g})")
    return high


def row_groups(batch: dict, fs, units: dict[str, tuple], columns: dict, on_error: str) -> Iterator[tuple]:
    """For each unit path (`<root>/<file>#<row group>`) of a Ray Data batch: (path, its samples, [], "") — the
    groups `transforms.decode_samples` takes — or under `on_error="skip"` (path, None, its error rows' keys, the
    error). A sample's key is `<file>:<row in the file>`: unique, and the same whichever partition reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in batch["path"]:
        file, _, g = path.rpartition("#")
        name = path.rsplit("/", 1)[-1]
        info = ShardInfo(*units[name])
        try:
            try:
                with fs.open_input_file(file) as f:
                    if f.size() != info.bytes:
                        raise DataError(f"shard {path}: size mismatch against its index ({f.size()} bytes, the index"
                                        f" says {info.bytes}): changed since it was indexed")
                    pf = pq.ParquetFile(f)
                    first = sum(pf.metadata.row_group(i).num_rows for i in range(int(g)))
                    table = pf.read_row_group(int(g), columns=[columns["image"], columns["label"]])
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"shard {path}: cannot read the row group ({e})") from e
            if table.num_rows != info.num_samples:
                raise DataError(f"shard {path}: {table.num_rows} rows, the index says {info.num_samples}")
            images = table.column(0).combine_chunks()
            if pa.types.is_struct(images.type):
                images = images.field("bytes")
            file_name = file.rsplit("/", 1)[-1]
            samples = [(f"{file_name}:{first + i}", image, "", label, None)
                       for i, (image, label) in enumerate(zip(images.to_pylist(), table.column(1).to_pylist()))]
            yield path, samples, [], ""
        except DataError as e:
            if on_error != "skip":
                raise
            yield path, None, [f"{path}#{i}" for i in range(info.num_samples)], str(e)


def decode_row_groups(batch: dict[str, np.ndarray], fs, units: dict[str, tuple], columns: dict, train: bool,
                      image_size: int, area_min: float = 0.05, seed: tuple[int, int] | None = None, flip: bool = True,
                      on_error: str = "error", labels: tuple[str, tuple[str, ...]] | None = None,
                      ship: bool = False) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` body over row groups (rows: "path" = `<root>/<file>#<row group>`): the rows of
    `transforms.decode_shards`, from the same per-sample decode and augmentation."""
    from vitray.data.transforms import decode_samples

    return decode_samples(row_groups(batch, fs, units, columns, on_error), train, image_size, area_min, seed, flip,
                          on_error, labels, ship)
