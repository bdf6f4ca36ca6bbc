"""Checkpoints: every rank's DeepSpeed state (ZeRO shards included) + where each data partition stood.

Each rank saves into its own local folder and hands it to `ray.train.report`; Ray Train uploads all of them into
one checkpoint folder in storage (local or s3://) and records it once every rank has reported. Once every rank's
upload has finished, rank 0 writes the commit marker `COMMIT` last, and then keeps the newest
`storage.keep_checkpoints` committed folders (`commit`: vitray's retention, not Ray's). A folder without the marker
is a save that was interrupted: resume skips it and says so, `vitray.checkpoints.load_model` refuses it, and the
next worker group deletes it before it saves that step again. (DeepSpeed's own `latest` file cannot serve: rank 0
writes it before the other ranks' shards are stored.) Resuming restores model, optimizer, LR schedule, step, data
position and RNG state.

Two ways to save (`saves.Checkpointer`, the loop's one seam): synchronously (`save`: training waits for the upload, then a
barrier, then the marker; the final save always, and every save with `storage.async_save=false`), or in the
background (`snapshot.begin`): training waits only while the state is gathered and copied into host memory, Ray
Train's asynchronous upload writes and uploads it, and the marker follows at the first step at which every rank says
its upload is done. Either way a checkpoint counts (`last_good`) only from its marker on.

Layout of `<run>/step_00001000/`:
    vitray.json                      step, world size, the run's config (no credentials: there are none in it)
    positions.json                   every data partition's position (epoch, samples consumed)
    position-rank00000.json ...      each rank's own partitions' positions and its torch RNG state
    model.safetensors                the whole fp32 weights, gathered from the partitions (what others load)
    ema.safetensors                  the Polyak-averaged weights, when the run keeps them
    state/                           DeepSpeed: mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt
    COMMIT                           written last: the checkpoint is complete
"""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
import time

import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from vitray import faults, storage
from vitray.checkpoints import (COMMIT, EMA_WEIGHTS, META, TAG, WEIGHTS, CheckpointError, load_model,  # noqa: F401
                                scan, step_dir)
from vitray.data.stream import Position

POSITIONS = "positions.json"  # every data partition's position, written by rank 0
UNIVERSAL = "universal"  # DeepSpeed's universal checkpoint of the same state, made for resuming on another world size
logger = logging.getLogger("vitray")


def save(engine, step: int, positions: dict[int, Position], metrics: dict, run_info: dict, ema=None) -> None:
    """Collective: every rank must call it at the same step. `ema` (torch's AveragedModel) is saved by rank 0.
    Synchronous: returns once every rank's files are in storage (then `commit`)."""
    rank = ray.train.get_context().get_world_rank()
    described = describe(engine, positions, ema)
    whole = full_weights(engine)  # collective: every rank helps gather; rank 0 keeps them
    folder = tempfile.mkdtemp(prefix=f"vitray-ckpt-{step}-")
    try:
        if rank == 0:  # written and dropped before DeepSpeed serialises its state: the two peaks do not add up
            save_file(whole, os.path.join(folder, WEIGHTS))
            if ema is not None:
                save_file(_plain(ema.state_dict()), os.path.join(folder, EMA_WEIGHTS))
        del whole
        engine.save_checkpoint(folder, tag=TAG, client_state={"step": step})
        write_small_files(folder, rank, step, positions, described, run_info)
        ray.train.report(
            {**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"step_{step:08d}",
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()  # every rank's report has returned: its files are in storage; the caller commits


def describe(engine, positions: dict[int, Position], ema=None) -> dict:
    """What vitray.json and positions.json record besides the config: digests of the weights and optimizer state
    (equal again after a restore) and every rank's data positions. Collective."""
    described = {"optimizer_digest": optimizer_digest(engine), "model_digest": module_digest(engine.module)}
    if ema is not None:
        described["ema_digest"] = module_digest(ema.module)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, positions)  # rank 0 writes them all in one file: one read on resume
    described["everyone"] = everyone
    return described


def write_small_files(folder: str, rank: int, step: int, positions: dict[int, Position], described: dict,
                      run_info: dict) -> None:
    """This rank's position file; on rank 0 also positions.json and vitray.json."""
    with open(os.path.join(folder, f"position-rank{rank:05d}.json"), "w") as f:
        json.dump({"partitions": {str(p): [pos.epoch, pos.consumed] for p, pos in positions.items()},
                   "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}, f)
    if rank != 0:
        return
    with open(os.path.join(folder, POSITIONS), "w") as f:
        json.dump({"partitions": {str(p): [pos.epoch, pos.consumed] for part in described["everyone"]
                                  for p, pos in sorted(part.items())}}, f)
    digests = {k: v for k, v in described.items() if k != "everyone"}
    with open(os.path.join(folder, META), "w") as f:
        json.dump({"step": step, **digests, **run_info}, f, indent=1)


def commit(run_uri: str, endpoint, step: int, keep: int) -> None:
    """Rank 0, once every rank's part of `step` is in storage: the marker that makes the checkpoint complete; then
    only the newest `keep` committed checkpoints stay, and no save older than this one that never committed.

    vitray keeps checkpoints by their markers, not Ray Train (`num_to_keep` is off in `launch.fit`): Ray counts what
    it registered, which includes a save torn before its marker, and when restarted workers save that step again,
    the same folder twice. Its retention would then delete a committed checkpoint, or one folder twice (the fit
    fails with "Path not found"). Ray's own list of the run's checkpoints is dropped before the next fit in the same
    folder (`forget_rays_record`)."""
    faults.crash_point("before-commit", step, 0, ready=lambda: _ray_registered(run_uri, endpoint, step_dir(step)))
    marker = {"step": step, "world_size": dist.get_world_size(), "time": time.time()}
    storage.write_bytes(storage.join(run_uri, step_dir(step), COMMIT), json.dumps(marker).encode(), endpoint)
    complete, incomplete = scan(run_uri, endpoint)
    _remove(run_uri, endpoint, complete[:-keep] + [s for s in incomplete if s < step])


def remove_torn(run_uri: str, endpoint, resumed: int | None) -> None:
    """Rank 0, when a worker group starts: the saves newer than the checkpoint it resumes from never committed (an
    earlier group was stopped during them). This group saves those steps again, into folders that must not keep
    the torn saves' files (another world size writes other shard files)."""
    _, incomplete = scan(run_uri, endpoint)
    _remove(run_uri, endpoint, [s for s in incomplete if resumed is None or s > resumed])


def _rays_record(run_uri: str) -> str:
    """Ray Train's own list of the run's checkpoints, in the run folder."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return storage.join(run_uri, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)


def _ray_registered(run_uri: str, endpoint, folder: str) -> bool:
    """Whether Ray Train's list of the run's checkpoints names `folder` (for the crash test: Ray registered it)."""
    uri = _rays_record(run_uri)
    return storage.exists(uri, endpoint) and folder in storage.read_bytes(uri, endpoint).decode()


def forget_rays_record(run_uri: str, endpoint) -> None:
    """The driver, before a fit in a run folder that has one: Ray Train's own list of the run's checkpoints
    (`checkpoint_manager_snapshot.json`). Ray refuses to start a fit whose list names a folder that is gone, and
    vitray's retention deletes folders Ray registered. vitray never reads that list (resume goes by the markers);
    without it, Ray starts its bookkeeping afresh."""
    fs, path = storage.resolve(_rays_record(run_uri), endpoint)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        storage.with_retries(lambda: fs.delete_file(path))


def _remove(run_uri: str, endpoint, steps: list[int]) -> None:
    fs, path = storage.resolve(run_uri, endpoint)
    for s in steps:
        try:
            storage.with_retries(lambda: fs.delete_dir(f"{path}/{step_dir(s)}"))
        except OSError as e:  # storage it cannot clean costs space, not the run
            logger.warning(f"{storage.join(run_uri, step_dir(s))}: could not delete ({e}); delete it by hand")


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The model's whole fp32 state dict on rank 0 (empty elsewhere), for `model.safetensors`: the same weights
    `zero_to_fp32` would rebuild from the saved files, without anyone unpickling those files later. Collective.

    Under ZeRO-3, or with bf16/fp16 parameters, the fp32 master copy is spread over the ranks: DeepSpeed's
    `safe_get_full_fp32_param` gathers one parameter at a time, so no rank holds more than one whole parameter on its
    device. Under ZeRO-1/2 with fp32 parameters every rank's module already holds them whole (DeepSpeed copies each
    updated fp32 partition back into them after every step): rank 0 copies its own, and nothing is sent (on CPU
    workers the per-parameter gather was 2.9 s of a ViT-B/16 background save's 3.7 s stall).

    Only rank 0 keeps what it gathers, and one copy of it: at ViT-H/14 the whole weights are 2.5 GB, and on CPU
    workers a second copy on rank 0 (or a copy on every rank) is what pushed the rehearsal's save past the node's
    memory (`cost.full_weights_bytes` plans the one copy)."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = dist.get_rank() == 0
    module = engine.module
    params = dict(module.named_parameters(remove_duplicate=False))
    whole_here = engine.zero_optimization_stage() < 3 and all(p.dtype == torch.float32 for p in params.values())
    if whole_here and not rank0:
        return {}
    kept: dict[int, torch.Tensor] = {}  # parameter id → its whole fp32 copy on the CPU (rank 0; None elsewhere)
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():  # the keys a plain model's load_state_dict wants
        p = params.get(name)
        if p is None:  # a buffer: whole on every rank
            if rank0:
                out[name] = value.detach().to("cpu", copy=True).contiguous()
            continue
        if id(p) in kept:  # a tied parameter: gathered once (by every rank: it is collective); a copy, since
            if rank0:      # safetensors refuses shared storage
                out[name] = kept[id(p)].clone()
            continue
        full = None if whole_here else safe_get_full_fp32_param(p)
        full = (full if full is not None else p.detach()).float()
        # A fresh tensor already (the gather's), unless it is the live parameter: copy only then. Other ranks drop
        # each gathered parameter at once.
        kept[id(p)] = out[name] = full.to("cpu", copy=full.data_ptr() == p.data_ptr()).contiguous() if rank0 else None
        del full
    if not rank0:
        return {}
    return out


def _plain(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def optimizer_digest(engine) -> float:
    """Sum of |x| over every optimizer-state tensor (moments, not step counters) on every rank: equal before a
    save and after its restore, on any number of workers."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    total = sum((t.double().abs().sum() for s in inner.state.values() for k, t in s.items()
                 if torch.is_tensor(t) and k != "step"),
                torch.zeros((), dtype=torch.float64))
    total = total.reshape(1).to(engine.device)
    dist.all_reduce(total)
    return total.item()


def latest_complete(run_uri: str, endpoint) -> "ray.train.Checkpoint | None":
    """The checkpoint to resume from: the newest committed one in the run's folder, or None on a fresh start. The
    marker decides, not Ray Train's own record: Ray registers a checkpoint asynchronously, so after a crash it
    may offer one step too few (registration still pending) or one too many (registered, marker never written).
    Rank 0 logs every checkpoint it skips."""
    complete, incomplete = scan(run_uri, endpoint)
    chosen = complete[-1] if complete else None
    skipped = [s for s in incomplete if chosen is None or s > chosen]
    if skipped and ray.train.get_context().get_world_rank() == 0:
        logger.warning(f"skipped incomplete checkpoint {', '.join(map(step_dir, skipped))} (no {COMMIT} marker: a"
                       f" save was interrupted); {f'resuming from {step_dir(chosen)}' if complete else 'starting afresh'}")
    if chosen is None:  # a first save torn: Ray Train restarted the workers before any checkpoint committed
        return None
    fs, path = storage.resolve(storage.join(run_uri, step_dir(chosen)), endpoint)
    return ray.train.Checkpoint(path, filesystem=fs)


def read_positions(checkpoint: "ray.train.Checkpoint | None", partitions: int,
                   same_world: bool = True) -> tuple[dict[int, Position], torch.Tensor | None]:
    """Every data partition's position in `checkpoint` (on another number of workers a rank continues partitions
    another rank saved), and this rank's torch RNG state when the worker count is unchanged (dropout draws
    continue; on a resize they start afresh). Two small reads per rank, whatever the number of workers: the data
    stream starts before the engine state is downloaded."""
    if checkpoint is None:
        return {}, None
    rank = ray.train.get_context().get_world_rank()
    fs = checkpoint.filesystem
    positions: dict[int, Position] = {}
    rng = None
    mine = f"{checkpoint.path}/position-rank{rank:05d}.json"
    merged = fs.get_file_info(f"{checkpoint.path}/{POSITIONS}").type != pafs.FileType.NotFound
    if merged:
        saved = json.loads(storage.with_retries(lambda: read_file(fs, f"{checkpoint.path}/{POSITIONS}")))
        positions = {int(p): Position(*pos) for p, pos in saved["partitions"].items()}
        infos = [fs.get_file_info(mine)] if same_world else []
    else:  # saved before positions.json: every rank's file
        infos = fs.get_file_info(pafs.FileSelector(checkpoint.path))
    for info in infos:
        if not info.base_name.startswith("position-rank"):
            continue
        saved = json.loads(storage.with_retries(lambda: read_file(fs, info.path)))
        saver = int(info.base_name.removeprefix("position-rank").removesuffix(".json"))
        if merged:
            pass  # positions.json had them all
        elif "partitions" in saved:
            positions.update({int(p): Position(*pos) for p, pos in saved["partitions"].items()})
        else:  # saved before partitions existed: one partition per rank
            positions[saver] = Position(saved["epoch"], saved["consumed"])
        if saver == rank and same_world:
            rng = torch.frombuffer(bytearray(base64.b64decode(saved["torch_rng"])), dtype=torch.uint8)
    if sorted(positions) != list(range(partitions)):
        raise CheckpointError(f"checkpoint {checkpoint.path}: holds data positions of partitions"
                              f" {sorted(positions)}, but the run has data.partitions={partitions}")
    return positions, rng


def restore(engine, checkpoint: "ray.train.Checkpoint | None", ema=None, resharded: bool = False) -> int | None:
    """Load `checkpoint` into `engine` (model, optimizer, LR schedule) and `ema`; its step, or None when there is
    no checkpoint. `resharded`: from its DeepSpeed universal form (`universal/`, see `make_universal`), into an
    engine built with `load_universal`."""
    if checkpoint is None:
        return None
    with tempfile.TemporaryDirectory(prefix="vitray-restore-") as scratch:
        folder = os.path.join(scratch, "checkpoint")

        def download() -> None:  # whole, again, if a transfer breaks off
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            pafs.copy_files(checkpoint.path, folder, source_filesystem=checkpoint.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())

        storage.with_retries(download)
        path, client_state = engine.load_checkpoint(folder, tag=UNIVERSAL if resharded else TAG)
        if path is None:
            raise CheckpointError(f"checkpoint {checkpoint.path}: DeepSpeed found no state under {TAG}/")
        if ema is not None:
            ema.load_state_dict(_read_ema(folder, checkpoint.path))
    return int(client_state["step"])


def _read_ema(folder: str, where: str) -> dict:
    """The averaged weights of a checkpoint being resumed; `ema.pt` from saves before `ema.safetensors`, read as
    plain tensors only (torch's weights_only unpickler runs no code)."""
    if os.path.exists(os.path.join(folder, EMA_WEIGHTS)):
        return load_file(os.path.join(folder, EMA_WEIGHTS))
    if os.path.exists(os.path.join(folder, "ema.pt")):
        return torch.load(os.path.join(folder, "ema.pt"), map_location="cpu", weights_only=True)
    raise CheckpointError(f"checkpoint {where}: transfer.ema_decay is set but it holds no {EMA_WEIGHTS}")


def read_commit(checkpoint: "ray.train.Checkpoint") -> dict:
    """The checkpoint's commit marker: step, the number of workers that saved it, and when."""
    return json.loads(storage.with_retries(lambda: read_file(checkpoint.filesystem, f"{checkpoint.path}/{COMMIT}")))


def read_file(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def make_universal(checkpoint_uri: str, endpoint) -> None:
    """Add `<checkpoint>/universal/`: the ZeRO partitions merged into DeepSpeed's universal checkpoint, which an
    engine of any world size loads (`"checkpoint": {"load_universal": true}`). Runs on the driver with DeepSpeed's
    own converter; the folder gets its own COMMIT marker last, so an interrupted conversion is redone."""
    import subprocess
    import sys

    if storage.exists(storage.join(checkpoint_uri, UNIVERSAL, COMMIT), endpoint):
        return
    fs, path = storage.resolve(checkpoint_uri, endpoint)
    with tempfile.TemporaryDirectory(prefix="vitray-universal-") as local:
        os.makedirs(f"{local}/{TAG}")
        pafs.copy_files(f"{path}/{TAG}", f"{local}/{TAG}", source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        # --inject_missing_state: the converter expects Megatron's bookkeeping, which a plain model does not need.
        done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               f"{local}/{TAG}", "--output_folder", f"{local}/{UNIVERSAL}", "--num_extract_workers",
                               "1", "--num_merge_workers", "1", "--inject_missing_state"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckpointError(f"{checkpoint_uri}: DeepSpeed's universal conversion failed:\n{done.stderr[-2000:]}")
        pafs.copy_files(f"{local}/{UNIVERSAL}", f"{path}/{UNIVERSAL}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    storage.write_bytes(storage.join(checkpoint_uri, UNIVERSAL, COMMIT), b"{}", endpoint)


def module_digest(module: torch.nn.Module) -> float:
    """Sum of |w| over the module's weights: equal before a save and after its restore, on any number of workers.
    Under ZeRO-3 each rank holds a slice (`ds_tensor`), so the slices' sums add up over the ranks — collective then,
    and no rank gathers a whole layer. The last slice is padded to the common size with memory DeepSpeed never
    writes (`torch.empty`): only the elements that belong to the parameter are summed, or the digest would read
    whatever was there (seen at 3 workers: 1.7e38)."""
    params = list(module.parameters())
    if params and hasattr(params[0], "ds_tensor"):
        rank, device = dist.get_rank(), params[0].ds_tensor.device
        total = torch.zeros(1, dtype=torch.float64, device=device)
        for p in params:
            size = p.ds_tensor.numel()
            mine = max(0, min(size, p.ds_numel - rank * size))  # this rank's slice is [rank·size, (rank+1)·size)
            total += p.ds_tensor.detach().narrow(0, 0, mine).double().abs().sum()
        dist.all_reduce(total)
        return total.item()
    return float(sum(p.detach().double().abs().sum().item() for p in params))
