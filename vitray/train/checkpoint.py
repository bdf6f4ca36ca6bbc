"""Checkpoints: every rank's DeepSpeed state (ZeRO shards included) + where each rank's data stream stood.

Each rank saves into its own local folder and hands it to `ray.train.report`; Ray Train uploads all of them into
one checkpoint folder in storage (local or s3://) and records it only once every rank has reported, keeping the
last `storage.keep_checkpoints`. Resuming (`ray.train.get_checkpoint()`) restores model, optimizer, LR schedule,
step and data position.

Layout of `<run>/step_00001000/`:
    vitray.json                      step, world size, the run's config (no credentials: there are none in it)
    position-rank00000.json ...      each rank's data position
    state/                           DeepSpeed: mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist

from vitray.data.stream import Position
from vitray.models.npz import CheckpointError

TAG = "state"


def save(engine, step: int, position: Position, metrics: dict, run_info: dict, ema=None) -> None:
    """Collective: every rank must call it at the same step. `ema` (torch's AveragedModel) is saved by rank 0."""
    rank = ray.train.get_context().get_world_rank()
    digest = optimizer_digest(engine)
    folder = tempfile.mkdtemp(prefix=f"vitray-ckpt-{step}-")
    try:
        engine.save_checkpoint(folder, tag=TAG, client_state={"step": step})
        with open(os.path.join(folder, f"position-rank{rank:05d}.json"), "w") as f:
            json.dump({"epoch": position.epoch, "consumed": position.consumed}, f)
        if rank == 0:
            extra = {}
            if ema is not None:
                torch.save(ema.state_dict(), os.path.join(folder, "ema.pt"))
                extra["ema_digest"] = module_digest(ema.module)
            with open(os.path.join(folder, "vitray.json"), "w") as f:
                json.dump({"step": step, "optimizer_digest": digest, **extra, **run_info}, f, indent=1)
        ray.train.report(
            {**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"step_{step:08d}",
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def optimizer_digest(engine) -> float:
    """Sum of |x| over every optimizer-state tensor on every rank: equal before a save and after its restore."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    total = sum((t.double().abs().sum() for s in inner.state.values() for t in s.values() if torch.is_tensor(t)),
                torch.zeros((), dtype=torch.float64))
    total = total.reshape(1).to(engine.device)
    dist.all_reduce(total)
    return total.item()


def read_position() -> Position:
    """This rank's data position in the latest checkpoint (a fresh Position when there is none). Reads one small
    file, so the data stream can start before the engine state is downloaded."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Position()
    rank = ray.train.get_context().get_world_rank()
    fs = checkpoint.filesystem
    path = f"{checkpoint.path}/position-rank{rank:05d}.json"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:  # resumed on more workers than saved it
        path = f"{checkpoint.path}/position-rank00000.json"
    with fs.open_input_stream(path) as f:
        return Position(**json.loads(f.read()))


def restore(engine, ema=None) -> int | None:
    """Load the latest reported checkpoint into `engine` (model, optimizer, LR schedule) and `ema`; its step, or
    None when there is no checkpoint."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path, client_state = engine.load_checkpoint(folder, tag=TAG)
        if path is None:
            raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed found no state under {TAG}/")
        if ema is not None:
            if not os.path.exists(os.path.join(folder, "ema.pt")):
                raise RuntimeError(f"checkpoint {checkpoint.path}: transfer.ema_decay is set but it holds no ema.pt")
            ema.load_state_dict(torch.load(os.path.join(folder, "ema.pt"), map_location=engine.device))
    return int(client_state["step"])


def module_digest(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().abs().sum().item() for p in module.parameters()))


def load_model(uri: str, endpoint=None, dropout: float = 0.0, weights: str = "auto") -> tuple[torch.nn.Module, dict]:
    """The model saved in a vitray checkpoint folder (any ZeRO stage). `weights`: "raw" (the
    trained weights), "ema" (their Polyak average; an error if the run kept none) or "auto" (the average when the
    run kept one: the paper evaluates the averaged weights). Returns the model and the checkpoint's vitray.json
    (step, config, ...) with "weights" saying which were loaded."""
    if weights not in ("auto", "raw", "ema"):
        raise ValueError(f"weights: {weights!r} is not 'auto', 'raw' or 'ema'")
    from vitray import storage
    from vitray.models.registry import build_model, get_spec

    with tempfile.TemporaryDirectory(prefix="vitray-load-") as local:
        fs, path = storage.resolve(uri, endpoint)
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        with open(os.path.join(local, "vitray.json")) as f:
            meta = json.load(f)
        saved = meta["config"]
        m = saved["model"]
        spec = get_spec(m["name"])
        model = build_model(m["name"], num_classes=m["num_classes"], image_size=saved["data"]["image_size"],
                            dropout=dropout, representation_size=spec.features if m["pre_logits"] else None)
        if saved["deepspeed"]["zero_stage"] == 0:
            state = torch.load(os.path.join(local, TAG, "mp_rank_00_model_states.pt"), map_location="cpu",
                               weights_only=False)["module"]
        else:  # DeepSpeed reassembles the fp32 weights from the ZeRO partitions
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(local, tag=TAG)
        ema_path = os.path.join(local, "ema.pt")
        if weights == "ema" and not os.path.exists(ema_path):
            raise CheckpointError(f"{uri}: holds no averaged (EMA) weights; the run had transfer.ema_decay = 0")
        if weights != "raw" and os.path.exists(ema_path):
            averaged = torch.load(ema_path, map_location="cpu")  # torch's AveragedModel: module.* + n_averaged
            state = {k.removeprefix("module."): v for k, v in averaged.items() if k.startswith("module.")}
            meta["weights"] = "ema"
        else:
            meta["weights"] = "raw"
    model.load_state_dict(state)
    return model, meta


def load_pretrained(cfg, endpoint) -> torch.nn.Module:
    """The model to fine-tune: weights from `cfg.transfer.init_from` — a vitray checkpoint folder or an official
    .npz — with the pretraining head swapped for a zero-initialised one for `cfg.model.num_classes` and the position
    embeddings interpolated to `cfg.data.image_size`."""
    from vitray import storage
    from vitray.models.registry import build_model

    uri, t = cfg.transfer.init_from, cfg.transfer
    if uri.endswith(".npz"):
        from vitray.models.npz import load_npz
        from vitray.models.registry import get_spec

        if get_spec(cfg.model.name).family != "vit":
            raise CheckpointError(f"{uri}: .npz import covers the plain ViT layout; {cfg.model.name} is not one")

        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.data.image_size,
                            dropout=cfg.model.dropout)
        return load_npz(model, storage.read_bytes(uri, endpoint), uri, load_head=False, posemb_method=t.posemb_method)
    model, _ = load_model(uri, endpoint, cfg.model.dropout)
    return model.adapt_for_finetuning(cfg.model.num_classes, cfg.data.image_size, t.posemb_method)
