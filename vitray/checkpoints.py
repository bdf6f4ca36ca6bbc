"""Reading models back: from a vitray run's checkpoint folder (any ZeRO stage) or a released `.npz` (vit_jax /
big_vision layout). No Ray: the evaluation, inspection and fine-tuning tools and the training driver all read
through here, so each fact about a checkpoint's layout has one reader.

A run's checkpoint folder `<storage>/runs/<run>/step_00001000/`:
    vitray.json        step, world size, the run's whole config (no credentials: there are none in it)
    model.safetensors  the whole fp32 weights, gathered from the ZeRO partitions at save time
    ema.safetensors    the Polyak-averaged weights, when the run kept them
    state/             DeepSpeed's files (`mp_rank_00_model_states.pt`, the ZeRO partitions): for resuming only
    COMMIT             written last: a folder without it is a save that was interrupted
(`vitray.train.checkpoint` writes them and adds each rank's data position.)

Loading never runs code from the folder. DeepSpeed's `.pt` files are pickles, and unpickling a file someone else
wrote can execute anything in it; so evaluation, inspection and `--init-from` read only the two safetensors files
(a header of JSON and raw tensor bytes) and the JSON files. Only DeepSpeed's own resume of a run (`train/`) reads
`state/`. A folder without `model.safetensors` is refused, never read through pickle.
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import pyarrow.fs as pafs

from vitray import storage
from vitray.models.npz import CheckpointError
from vitray.storage import Endpoint

META = "vitray.json"
COMMIT = "COMMIT"
TAG = "state"  # DeepSpeed's checkpoint tag: the folder its files go in
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
STEP_DIR = re.compile(r"^step_(\d{8})$")

__all__ = ["CheckpointError", "META", "COMMIT", "TAG", "WEIGHTS", "EMA_WEIGHTS", "step_dir", "require_complete", "scan", "is_npz", "read_meta", "describe",
           "load_model", "npz_model", "check_init_from"]


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def is_npz(uri: str) -> bool:
    return uri.endswith(".npz")


def scan(run_uri: str, endpoint: Endpoint | None) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps of a run, oldest first: complete ones hold the commit marker."""
    fs, path = storage.resolve(run_uri, endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"{run_uri}: cannot list checkpoints ({e})") from e
    complete, incomplete = [], []
    for info in infos:
        m = STEP_DIR.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            committed = fs.get_file_info(f"{info.path}/{COMMIT}").type != pafs.FileType.NotFound
            (complete if committed else incomplete).append(int(m.group(1)))
    return sorted(complete), sorted(incomplete)


def read_meta(uri: str, endpoint: Endpoint | None) -> dict:
    """A checkpoint folder's vitray.json (step, world_size, config, ...), or an error naming the folder."""
    try:
        return json.loads(storage.read_bytes(storage.join(uri, META), endpoint))
    except storage.StorageError as e:
        raise CheckpointError(f"{uri}: not a vitray checkpoint folder (no readable {META}: {e})") from e


def require_complete(uri: str, endpoint: Endpoint | None, where: str | None = None) -> None:
    """Refuse a folder that is not a whole checkpoint: one that does not exist, a save that was interrupted (no
    commit marker), or one without the safe weights export — before anything else is read."""
    where = where or uri
    if not storage.exists(storage.join(uri, COMMIT), endpoint):
        if storage.exists(storage.join(uri, META), endpoint):
            raise CheckpointError(f"{where} is an incomplete checkpoint (no {COMMIT} marker: its save was"
                                  " interrupted); use an earlier step")
        raise CheckpointError(f"{where} not found (give a vitray checkpoint folder, <storage>/runs/<name>/step_N,"
                              " or an official .npz)")
    if not storage.exists(storage.join(uri, WEIGHTS), endpoint):
        raise CheckpointError(f"{where} holds no {WEIGHTS} (saved by an older vitray): vitray reads a checkpoint"
                              " as weights only and never unpickles DeepSpeed's state/ files; resume that run with"
                              " this version to write one")


def _npz_shapes(uri: str, endpoint: Endpoint | None) -> dict[str, tuple[int, ...]]:
    from vitray.models.npz import read_npz_shapes

    fs, path = storage.resolve(uri, endpoint)
    try:
        with fs.open_input_file(path) as f:  # seekable: only the zip directory and the array headers are read
            return read_npz_shapes(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{uri}: not found") from e
    except CheckpointError as e:
        raise CheckpointError(f"{uri}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{uri}: cannot read ({e})") from e


def _npz_spec(uri: str, shapes: dict) -> tuple:
    """(ViTSpec, num_classes, representation size or None, square grid side or None) read off the array shapes."""
    from vitray.models.specs import ViTSpec

    need = ("embedding/kernel", "Transformer/posembed_input/pos_embedding", "head/kernel",
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if any(k not in shapes for k in need):
        raise CheckpointError(f"{uri}: not a ViT .npz (needs {', '.join(need)}; a ResNet has no patch embedding or"
                              " position embeddings)")
    p, _, _, d = shapes["embedding/kernel"]
    depth = sum(1 for k in shapes if k.endswith("MultiHeadDotProductAttention_1/query/kernel"))
    heads = shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"][1]
    mlp = shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][1]
    tokens = shapes["Transformer/posembed_input/pos_embedding"][1] - 1
    side = int(round(tokens ** 0.5))
    rep = shapes["pre_logits/kernel"][1] if "pre_logits/kernel" in shapes else None
    spec = ViTSpec(width=d, depth=depth, mlp_dim=mlp, heads=heads, patch=p)
    return spec, shapes["head/kernel"][1], rep, side if side * side == tokens else None


def describe(uri: str, endpoint: Endpoint | None) -> dict:
    """What a checkpoint holds, without loading its weights: model name, its spec (what it is: `vitray.models.specs`),
    family and kind, classes of its head, the image size it was trained at, depth; and the run's saved config for a
    vitray folder (None for an .npz)."""
    from vitray.models.registry import get_spec

    if is_npz(uri):
        spec, classes, _, side = _npz_spec(uri, _npz_shapes(uri, endpoint))
        name, saved = f"ViT D={spec.width} L={spec.depth} heads={spec.heads} /{spec.patch} (.npz)", None
        image_size = side * spec.patch if side else None
    else:
        require_complete(uri, endpoint)
        saved = read_meta(uri, endpoint)["config"]
        name, classes, image_size = saved["model"]["name"], saved["model"]["num_classes"], saved["data"]["image_size"]
        spec = get_spec(name)
    return {"name": name, "spec": spec, "family": spec.family, "kind": spec.kind, "num_classes": classes,
            "image_size": image_size, "depth": spec.depth, "config": saved}


def npz_model(uri: str, endpoint: Endpoint | None, image_size: int | tuple[int, int] | None = None):
    """A ViT built from an official `.npz` (the architecture read off its shapes) with its weights, position
    embeddings resized to `image_size` (default: the file's own square grid)."""
    from vitray.models.npz import load_npz
    from vitray.models.vit import ViT

    spec, classes, rep, side = _npz_spec(uri, _npz_shapes(uri, endpoint))
    if image_size is None:
        if side is None:
            raise CheckpointError(f"{uri}: its position embeddings are not a square grid; give the image size (H,W)")
        image_size = side * spec.patch
    model = ViT(spec, num_classes=classes, image_size=image_size, representation_size=rep)
    return load_npz(model, storage.read_bytes(uri, endpoint), uri)


def read_weights(uri: str, endpoint: Endpoint | None) -> dict:
    """A safetensors file's tensors, on the CPU. The format is a JSON header and raw bytes: reading it cannot run
    code. The file is fetched to local disk first, so the tensors are memory-mapped rather than held twice."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fs, path = storage.resolve(uri, endpoint)
    with tempfile.TemporaryDirectory(prefix="vitray-load-") as local:
        name = os.path.join(local, os.path.basename(path))
        storage.with_retries(lambda: pafs.copy_files(path, name, source_filesystem=fs,
                                                     destination_filesystem=pafs.LocalFileSystem()))
        try:
            return load_file(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{uri}: not a readable safetensors file ({e})") from None


def load_model(uri: str, endpoint: Endpoint | None = None, dropout: float = 0.0, weights: str = "auto",
               image_size: int | tuple[int, int] | None = None):
    """(model, metadata) from a vitray checkpoint folder or an official `.npz`. `weights`: "raw" (the trained
    weights), "ema" (their Polyak average; an error if the run kept none) or "auto" (the average when the run kept
    one: the paper evaluates the averaged weights). `image_size`: evaluate at another resolution (position
    embeddings interpolated in 2-D). The metadata is the folder's vitray.json, with "weights" saying which were
    loaded ("npz" for a released file)."""
    if weights not in ("auto", "raw", "ema"):
        raise ValueError(f"weights: {weights!r} is not 'auto', 'raw' or 'ema'")
    if is_npz(uri):
        if weights == "ema":
            raise CheckpointError(f"{uri}: a released .npz holds one set of weights, not an average (--weights ema)")
        model = npz_model(uri, endpoint, image_size)
        return model, {"checkpoint": uri, "step": None, "weights": "npz", "config": None}
    from vitray.models.registry import build_model

    require_complete(uri, endpoint)
    meta = read_meta(uri, endpoint)
    saved = meta["config"]
    m = saved["model"]
    model = build_model(m["name"], num_classes=m["num_classes"], image_size=saved["data"]["image_size"],
                        dropout=dropout, pre_logits=m["pre_logits"])
    has_ema = storage.exists(storage.join(uri, EMA_WEIGHTS), endpoint)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{uri}: holds no averaged (EMA) weights; the run had transfer.ema_decay = 0")
    meta["weights"] = "ema" if weights != "raw" and has_ema else "raw"
    if meta["weights"] == "ema":  # torch's AveragedModel: module.* + n_averaged
        averaged = read_weights(storage.join(uri, EMA_WEIGHTS), endpoint)
        state = {k.removeprefix("module."): v for k, v in averaged.items() if k.startswith("module.")}
    else:
        state = read_weights(storage.join(uri, WEIGHTS), endpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # names the keys that do not fit
        raise CheckpointError(f"{uri}: its weights do not fit {m['name']}: {e}") from None
    if image_size is not None and hasattr(model, "resize_grid"):  # ViTs and hybrids; a ResNet takes any size
        model.resize_grid(image_size)
    return model, meta


def check_init_from(uri: str, model_name: str, num_classes: int, image_size: int, endpoint: Endpoint | None) -> None:
    """Before Ray starts: the weights `transfer.init_from` names exist, are complete and fit `model_name` — so a bad
    file fails in the driver with the key or field named, not ~30 s later inside the workers."""
    from vitray.models.registry import get_spec

    where = f"transfer.init_from: {uri}"
    target = get_spec(model_name)
    if is_npz(uri):
        if not target.loads_released_npz:
            raise CheckpointError(f"{where}: .npz import covers the plain ViT layout; {model_name} is not one")
        import torch

        from vitray.models.npz import check_npz
        from vitray.models.registry import build_model

        with torch.device("meta"):  # shapes only: no memory, even for H/14
            model = build_model(model_name, num_classes=num_classes, image_size=image_size)
        check_npz(_npz_shapes(uri, endpoint), model, where, load_head=False)
        return
    require_complete(uri, endpoint, where)
    saved = read_meta(uri, endpoint)["config"]["model"]["name"]
    source = get_spec(saved)
    backbone = target.backbone_spec  # DETR initialises only its backbone, from a classifier
    if backbone is not None:
        if not target.accepts_backbone(source):
            raise CheckpointError(f"{where} holds {saved}; the backbone of {model_name} ({backbone.blocks} blocks ×"
                                  f" width {backbone.width}) needs a BiT ResNet of that shape")
    elif source != target:
        raise CheckpointError(f"{where} holds {saved}, not {model_name}: set model.name={saved} (fine-tuning keeps"
                              " the architecture; only the head and the resolution change)")


def pretrained_for_finetuning(cfg, endpoint: Endpoint | None):
    """The model to fine-tune: weights from `cfg.transfer.init_from` — a vitray checkpoint folder or an official
    .npz — with the pretraining head swapped for a zero-initialised one for `cfg.model.num_classes` and the position
    embeddings interpolated to `cfg.data.image_size` (the paper's transfer recipe)."""
    from vitray.models.registry import build_model, get_spec

    uri, t = cfg.transfer.init_from, cfg.transfer
    if is_npz(uri):
        from vitray.models.npz import load_npz

        if not get_spec(cfg.model.name).loads_released_npz:
            raise CheckpointError(f"{uri}: .npz import covers the plain ViT layout; {cfg.model.name} is not one")
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.data.image_size,
                            dropout=cfg.model.dropout)
        return load_npz(model, storage.read_bytes(uri, endpoint), uri, load_head=False, posemb_method=t.posemb_method)
    model, _ = load_model(uri, endpoint, cfg.model.dropout)
    return model.adapt_for_finetuning(cfg.model.num_classes, cfg.data.image_size, t.posemb_method)
