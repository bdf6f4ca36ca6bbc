"""Asynchronous saves (`storage.async_save`): the training step pays only for gathering the state and copying it
into host memory; writing the files and uploading them run beside the next steps.

`SnapshotEngine` is a DeepSpeed checkpoint engine (DeepSpeed's `CheckpointEngine` seam, set on
`engine.checkpoint_engine` for the length of one `save_checkpoint`): where DeepSpeed's own engine would `torch.save`
each state dict, it keeps a copy whose tensors are cloned to CPU. A copy, not a reference: the optimizer changes its
moments and master weights in place at the next step. `Snapshot.write` later `torch.save`s those copies under the
same names, so `engine.load_checkpoint`, `zero_to_fp32` and `ds_to_universal` read them as they read any save.

`Snapshot.upload` is the `checkpoint_upload_fn` of Ray Train's asynchronous upload (`ray.train.report(...,
checkpoint_upload_mode=ASYNC)`): in Ray's upload thread it writes the files, copies them into the run's storage and
says it is done. The commit marker is not written here — only once every rank's upload is done (`saves.Checkpointer`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager

import pyarrow.fs as pafs
import ray.train
import torch
from safetensors.torch import save_file

from vitray import faults, storage
from vitray.checkpoints import EMA_WEIGHTS, TAG, WEIGHTS
from vitray.train.checkpoint import _plain, describe, full_weights, write_small_files


class SnapshotEngine:
    """Holds each state dict DeepSpeed hands it (path → host copy) instead of writing it. DeepSpeed's
    `CheckpointEngine` interface, method for method, without subclassing it: importing DeepSpeed here would come
    before a worker has told it which accelerator to use (`loop._device`)."""

    def __init__(self, zipfile_serialization: bool = True):
        self.name = "VitraySnapshotEngine"
        self.zipfile_serialization = zipfile_serialization
        self.held: list[tuple[str, object]] = []
        self.nbytes = 0

    def create(self, info) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        self.held.append((path, self._host_copy(state_dict, {})))

    def load(self, path: str, map_location=None):
        # Only ever installed for the length of a save: restoring goes through DeepSpeed's own engine and vitray's
        # checks, and this one never unpickles a file it was handed.
        raise NotImplementedError(f"{path}: the snapshot engine only saves")

    def commit(self, info) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info) -> None:
        pass

    def get_commit_info(self):
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        # Each tensor is cloned on its own below, so DeepSpeed's extra clone (against pickling a whole shared
        # storage for a view) would only copy it twice.
        return False

    def _host_copy(self, item, seen: dict):
        """`item` with every tensor cloned to CPU; containers rebuilt, other values kept (DeepSpeed's config,
        versions, shapes: not changed by a training step). Tensors viewing the same memory the same way (tied
        weights) stay one tensor, as torch.save would have stored them."""
        if torch.is_tensor(item):
            key = (item.untyped_storage().data_ptr(), item.storage_offset(), tuple(item.shape), tuple(item.stride()),
                   item.dtype, item.device)
            if key not in seen:
                seen[key] = item.detach().to("cpu", copy=True)
                self.nbytes += seen[key].nbytes
            return seen[key]
        if isinstance(item, dict):
            return type(item)((k, self._host_copy(v, seen)) for k, v in item.items())
        if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
            return type(item)(self._host_copy(v, seen) for v in item)
        return item


@contextmanager
def snapshotting(engine):
    """`engine.save_checkpoint` inside keeps host copies (the yielded `SnapshotEngine`) instead of writing files."""
    original = engine.checkpoint_engine
    held = SnapshotEngine(getattr(original, "zipfile_serialization", True))
    engine.checkpoint_engine = held
    try:
        yield held
    finally:
        engine.checkpoint_engine = original


class Snapshot:
    """One rank's save in flight: DeepSpeed's states and rank 0's weights in host memory, the small files already
    in `folder`; written and uploaded by `upload` in Ray Train's upload thread."""

    def __init__(self, step: int, rank: int, folder: str, held: SnapshotEngine, weights: dict[str, dict]):
        self.step, self.rank, self.folder = step, rank, folder
        self.held, self.weights = held, weights  # weights: file name → state dict (model.safetensors, ema)
        self.nbytes = held.nbytes + sum(t.nbytes for w in weights.values() for t in w.values())
        self.done, self.failed, self.upload_s = threading.Event(), False, 0.0
        self.started = time.time()
        self._storage = _ray_storage()  # read here: Ray's upload thread has no train context of its own
        self._local = pafs.LocalFileSystem()

    def write(self) -> None:
        """The files DeepSpeed (and rank 0) would have written, from the host copies, which are then let go."""
        for path, state in self.held.held:
            torch.save(state, path, _use_new_zipfile_serialization=self.held.zipfile_serialization)
        for name, state in self.weights.items():
            save_file(state, os.path.join(self.folder, name))
        self.held.held, self.weights = [], {}

    def upload(self, checkpoint, dir_name: str):
        """Ray Train's `checkpoint_upload_fn`: write, then copy into the run's storage — DeepSpeed's state first, the
        small files after (a rank killed between the two leaves a torn save, which the missing COMMIT marks)."""
        began = time.time()
        try:
            if self.held.held or self.weights:  # Ray retries a failed upload: the files are written once
                self.write()
            fs, dest = self._storage.storage_filesystem, self._storage.build_checkpoint_path_from_name(dir_name)
            # As Ray Train copies: large chunks, and no threads into S3 (pyarrow's multi-threaded uploads can hang).
            options = {"chunk_size": 64 << 20, "use_threads": not isinstance(fs, pafs.S3FileSystem)}
            parts = sorted(os.listdir(self.folder), key=lambda name: not os.path.isdir(os.path.join(self.folder, name)))
            for i, name in enumerate(parts):
                src = os.path.join(self.folder, name)
                fs.create_dir(f"{dest}/{name}" if os.path.isdir(src) else dest, recursive=True)
                storage.with_retries(lambda: pafs.copy_files(src, f"{dest}/{name}", source_filesystem=self._local,
                                                              destination_filesystem=fs, **options))
                if i == 0:
                    faults.crash_point("mid-upload", self.step, self.rank)
        except BaseException:
            self.failed = True
            raise
        self.upload_s = time.time() - began
        self.done.set()
        return ray.train.Checkpoint(dest, filesystem=fs)

    def state(self) -> list[float]:
        """[not done, failed, upload seconds]: what the ranks reduce (max) to agree whether the save is stored."""
        return [0.0 if self.done.is_set() else 1.0, 1.0 if self.failed else 0.0, self.upload_s]


def begin(engine, step: int, positions: dict, metrics: dict, run_info: dict, ema=None) -> tuple[Snapshot, dict]:
    """Collective: the part of an asynchronous save that training waits for — digests and the gathered weights
    (`gather_s`), DeepSpeed's state copied to host memory (`state_s`), the small files — then hands the folder to
    Ray Train's asynchronous upload. The snapshot in flight and the checkpoint event's figures."""
    rank = ray.train.get_context().get_world_rank()
    began = time.time()
    described = describe(engine, positions, ema)
    whole = full_weights(engine)  # collective: every rank helps gather; rank 0 keeps them
    weights = {WEIGHTS: whole} if rank == 0 else {}
    if rank == 0 and ema is not None:
        weights[EMA_WEIGHTS] = _plain(ema.state_dict())
    gathered = time.time()
    folder = tempfile.mkdtemp(prefix=f"vitray-ckpt-{step}-")
    try:
        with snapshotting(engine) as held:
            engine.save_checkpoint(folder, tag=TAG, client_state={"step": step})
        write_small_files(folder, rank, step, positions, described, run_info)
        copied = time.time()
        pending = Snapshot(step, rank, folder, held, weights)
        # Ray Train deletes the folder once the upload returns (its default for ASYNC).
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step_{step:08d}",
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=pending.upload)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return pending, {"gather_s": gathered - began, "state_s": copied - gathered, "snapshot_bytes": pending.nbytes}


def _ray_storage():
    return ray.train.get_context().get_storage()
