"""How a split is read and decoded: one small frozen value, `ReadSpec`, instead of the dozen loose arguments every
reader used to pass down.

The same facts travel from the config to the driver (the held-out set, `reading.build_dataset`), to every training
worker (`stream.TrainStream`) and into the Ray Data decode tasks; keeping them in one value means a new decode option
is added in one place, and a reader cannot get two of them in the wrong order. What a reader needs besides the spec
is where the data is (a URI or paths, an endpoint or filesystem) and, for the training stream, how it is dealt and
batched.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ReadSpec:
    image_size: int  # images leave the pipeline image_size × image_size
    train: bool  # training: inception crop, flip, augmentation draws; evaluation: resize and centre crop
    area_min: float = 0.05  # training: the inception crop keeps area_min–100 % of the image
    flip: bool = True  # training: random horizontal flips
    bad_samples: str = "error"  # error = stop naming shard and key | skip = drop, count and log each one
    # The task's decoder (`Task.decoder()`), passed through untouched: None = images with class labels; otherwise
    # what the task's own decode function needs (detection: max_boxes, num_classes, crop_min).
    decoder: Any = None
    columns: tuple[str, str] = ("image", "label")  # a Parquet folder with no manifest: its image and label columns
    decode_on: str = "cpu"  # cpu = pixels from the Ray Data tasks | gpu = training JPEGs travel encoded
    seed: int = 0  # the run's seed: shard order and augmentation draws

    @classmethod
    def from_config(cls, data, seed: int, decoder: Any = None, train: bool = True) -> "ReadSpec":
        """The spec of a run's training data (`train=True`) or held-out data, from `cfg.data` (a
        `vitray.config.schema.DataConfig`: not imported, as config and data sit side by side), the run's seed and
        the task's decoder."""
        return cls(image_size=data.image_size, train=train, area_min=data.crop_area_min, flip=data.flip,
                   bad_samples=data.bad_samples, decoder=decoder, columns=(data.image_column, data.label_column),
                   decode_on=data.decode_on, seed=seed)

    @property
    def ship(self) -> bool:
        """Whether JPEGs leave the decode tasks encoded, for the training worker's device to decode
        (`vitray/data/device_decode.py`). Evaluation always gets pixels."""
        return self.train and self.decode_on == "gpu"
