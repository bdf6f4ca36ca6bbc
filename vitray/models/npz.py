"""Released ViT checkpoints: the official `.npz` format of vit_jax / big_vision ↔ vitray's ViT.

Parameter names (flattened with "/"):
    embedding/kernel (P, P, 3, D), embedding/bias, cls (1, 1, D),
    Transformer/posembed_input/pos_embedding (1, N, D),
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}, .../MultiHeadDotProductAttention_1/{query,key,value}/kernel
    (D, H, D/H) and bias (H, D/H), .../out/kernel (H, D/H, D), .../LayerNorm_2, .../MlpBlock_3/Dense_{0,1},
    Transformer/encoder_norm/{scale,bias}, pre_logits/{kernel,bias} (optional), head/{kernel,bias}.
Flax Dense kernels are (in, out): torch Linear weights are their transpose.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch

from vitray.models.posemb import resize_pos_embed
from vitray.models.vit import ViT


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the key(s)."""


def _attn(i: int) -> str:
    return f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1"


def to_npz_dict(model: ViT) -> dict[str, np.ndarray]:
    """vitray ViT → the official parameter names and layouts."""
    d, h = model.spec.width, model.spec.heads
    t = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = {
        "embedding/kernel": t["patch_embed.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": t["patch_embed.bias"],
        "cls": t["cls_token"],
        "Transformer/posembed_input/pos_embedding": t["pos_embed"],
        "Transformer/encoder_norm/scale": t["norm.weight"],
        "Transformer/encoder_norm/bias": t["norm.bias"],
        "head/kernel": t["head.weight"].T,
        "head/bias": t["head.bias"],
    }
    if "pre_logits.0.weight" in t:
        out["pre_logits/kernel"], out["pre_logits/bias"] = t["pre_logits.0.weight"].T, t["pre_logits.0.bias"]
    for i in range(model.spec.depth):
        b, blk = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[blk + "LayerNorm_0/scale"], out[blk + "LayerNorm_0/bias"] = t[b + "norm1.weight"], t[b + "norm1.bias"]
        out[blk + "LayerNorm_2/scale"], out[blk + "LayerNorm_2/bias"] = t[b + "norm2.weight"], t[b + "norm2.bias"]
        qkv_w, qkv_b = t[b + "attn.qkv.weight"], t[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[f"{_attn(i)}/{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            out[f"{_attn(i)}/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        out[f"{_attn(i)}/out/kernel"] = t[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        out[f"{_attn(i)}/out/bias"] = t[b + "attn.proj.bias"]
        for k, fc in ((0, "fc1"), (1, "fc2")):
            out[f"{blk}MlpBlock_3/Dense_{k}/kernel"] = t[f"{b}mlp.{fc}.weight"].T
            out[f"{blk}MlpBlock_3/Dense_{k}/bias"] = t[f"{b}mlp.{fc}.bias"]
    return out


def save_npz(model: ViT) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **to_npz_dict(model))
    return buf.getvalue()


def npz_shapes(model: ViT) -> dict[str, tuple[int, ...]]:
    """The official key → shape layout `model` expects, from its parameter shapes alone (works on the meta device,
    so a checkpoint can be checked against a 632 M-parameter model without building it)."""
    d, h, s = model.spec.width, model.spec.heads, {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rev = lambda k: s[k][::-1]  # noqa: E731  (Dense kernels are (in, out))
    out = {"embedding/kernel": tuple(s["patch_embed.weight"][i] for i in (2, 3, 1, 0)),
           "embedding/bias": s["patch_embed.bias"], "cls": s["cls_token"],
           "Transformer/posembed_input/pos_embedding": s["pos_embed"],
           "Transformer/encoder_norm/scale": s["norm.weight"], "Transformer/encoder_norm/bias": s["norm.bias"],
           "head/kernel": rev("head.weight"), "head/bias": s["head.bias"]}
    if "pre_logits.0.weight" in s:
        out["pre_logits/kernel"], out["pre_logits/bias"] = rev("pre_logits.0.weight"), s["pre_logits.0.bias"]
    for i in range(model.spec.depth):
        blk = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            out[f"{blk}{ln}/scale"] = out[f"{blk}{ln}/bias"] = (d,)
        for name in ("query", "key", "value"):
            out[f"{_attn(i)}/{name}/kernel"], out[f"{_attn(i)}/{name}/bias"] = (d, h, d // h), (h, d // h)
        out[f"{_attn(i)}/out/kernel"], out[f"{_attn(i)}/out/bias"] = (h, d // h, d), (d,)
        for k, fc in ((0, "fc1"), (1, "fc2")):
            out[f"{blk}MlpBlock_3/Dense_{k}/kernel"] = rev(f"blocks.{i}.mlp.{fc}.weight")
            out[f"{blk}MlpBlock_3/Dense_{k}/bias"] = s[f"blocks.{i}.mlp.{fc}.bias"]
    return out


HEAD_KEYS = ("head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias")
POS_KEY = "Transformer/posembed_input/pos_embedding"


def check_npz(shapes: dict[str, tuple[int, ...]], model: ViT, where: str, load_head: bool = True) -> None:
    """Every key `model` needs is there with a shape it can take, and nothing else is: a 12-block file must not load
    into a 6-block model by dropping half of it. Position embeddings of another square grid are fine (resized).
    `load_head=False`: the file's head (and pre-logits) are not used, whatever their shape."""
    expected = npz_shapes(model)
    skip = () if load_head else HEAD_KEYS
    missing = [k for k in expected if k not in shapes and k not in skip]
    if missing:
        raise CheckpointError(f"{where}: missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
    unexpected = sorted(k for k in shapes if k not in expected and k not in skip)
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} keys the model has no place for (another depth or head?):"
                              f" {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    pos, want = shapes[POS_KEY], expected[POS_KEY]
    if pos != want:  # another resolution: the grid is resized, the class token kept
        old = int(round(np.sqrt(pos[1] - 1)))
        if len(pos) != 3 or old * old != pos[1] - 1 or pos[2] != want[2]:
            raise CheckpointError(f"{where}: {POS_KEY} has shape {pos}, cannot map to {want}")
    wrong = [f"{k} {shapes[k]} ≠ {v}" for k, v in expected.items()
             if k not in skip and k != POS_KEY and shapes[k] != v]
    if wrong:
        raise CheckpointError(f"{where}: shape mismatch: {'; '.join(wrong[:5])}")


# The zip directory states each member's sizes, and deflate cannot expand data more than ~1032-fold (one 258-byte
# match per 2 bits): a member claiming more than that of its compressed bytes is a lie, refused before inflating.
_DEFLATE_RATIO, _SLACK = 1032, 1024


def array_header(stream, nbytes: int, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one `.npy` stream of `nbytes` bytes, from its header. `np.load` allocates what the header
    claims before it reads a byte of data, so a small file claiming a huge shape would take the machine's memory:
    refused (CheckpointError naming `key`) unless shape × itemsize is exactly the data after the header — which
    every honest file passes. Object dtypes are refused too: they are pickles, and loading one can run code."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream)
    if dtype.hasobject:
        raise CheckpointError(f"{key!r}: dtype {dtype} holds Python objects (a pickle), which are never loaded")
    claimed, held = math.prod(shape) * dtype.itemsize, nbytes - stream.tell()
    if claimed != held:
        raise CheckpointError(f"{key!r}: its header claims shape {tuple(shape)} of {dtype} ({claimed:,} bytes), but"
                              f" {held:,} bytes of data follow it: not an array numpy wrote; refused before"
                              " allocating it")
    return tuple(shape), dtype


def read_npz_shapes(f) -> dict[str, tuple[int, ...]]:
    """key → shape of every array in an `.npz` (a seekable binary file), from the zip directory and the array
    headers only: a 2.5 GB released checkpoint is checked in milliseconds, before anything is downloaded whole.
    Each member's sizes are checked against the file and its header (`array_header`), so `np.load` of a file that
    passes allocates no more than the file holds (or its deflated members can expand to)."""
    import zipfile

    shapes = {}
    try:
        end = f.seek(0, 2)
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                key = info.filename.removesuffix(".npy")
                _check_member(info, end, key)
                with z.open(info) as member:
                    shapes[key] = array_header(member, info.file_size, key)[0]
    except CheckpointError:
        raise
    except Exception as e:  # zip/format errors come in many types
        raise CheckpointError(f"not a readable .npz ({type(e).__name__}: {e})") from e
    return shapes


def _check_member(info, end: int, key: str) -> None:
    import zipfile

    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # numpy writes only these two
        raise CheckpointError(f"{key!r}: zip compression method {info.compress_type} (numpy writes stored or"
                              " deflated members only)")
    if info.header_offset + info.compress_size > end:
        raise CheckpointError(f"{key!r}: the zip directory places {info.compress_size:,} bytes beyond the file's"
                              f" {end:,}")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise CheckpointError(f"{key!r}: stored uncompressed, yet the zip directory gives two sizes"
                              f" ({info.file_size:,} and {info.compress_size:,} bytes)")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _DEFLATE_RATIO * info.compress_size + _SLACK:
        raise CheckpointError(f"{key!r}: claims {info.file_size:,} bytes from {info.compress_size:,} deflated ones,"
                              " more than deflate can expand to")


def load_npz(model: ViT, data: bytes, where: str = "checkpoint", load_head: bool = True,
             posemb_method: str = "bilinear") -> ViT:
    """Copy an official `.npz` into `model` (in place). Position embeddings are resized to the model's grid; with
    `load_head=False` the model keeps its own head (fine-tuning on new classes)."""
    try:
        read_npz_shapes(io.BytesIO(data))  # every member's header against its size, before np.load allocates
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            params = {k: f[k] for k in f.files}
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except Exception as e:  # zip/format errors come in many types
        raise CheckpointError(f"{where}: not a readable .npz ({type(e).__name__}: {e})") from e
    check_npz({k: v.shape for k, v in params.items()}, model, where, load_head)
    skip = () if load_head else HEAD_KEYS
    pos = params[POS_KEY]
    if pos.shape != tuple(model.pos_embed.shape):
        old = int(round(np.sqrt(pos.shape[1] - 1)))
        params[POS_KEY] = resize_pos_embed(torch.from_numpy(pos), (old, old), model.grid, posemb_method).numpy()
    state = _to_state_dict(model, {k: v for k, v in params.items() if k not in skip})
    current = model.state_dict()
    current.update(state)
    model.load_state_dict(current)
    return model


def _to_state_dict(model: ViT, p: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    d = model.spec.width
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    s = {
        "patch_embed.weight": T(p["embedding/kernel"].transpose(3, 2, 0, 1)),
        "patch_embed.bias": T(p["embedding/bias"]),
        "cls_token": T(p["cls"]),
        "pos_embed": T(p["Transformer/posembed_input/pos_embedding"]),
        "norm.weight": T(p["Transformer/encoder_norm/scale"]),
        "norm.bias": T(p["Transformer/encoder_norm/bias"]),
    }
    if "head/kernel" in p:
        s["head.weight"], s["head.bias"] = T(p["head/kernel"].T), T(p["head/bias"])
    if "pre_logits/kernel" in p:
        s["pre_logits.0.weight"], s["pre_logits.0.bias"] = T(p["pre_logits/kernel"].T), T(p["pre_logits/bias"])
    for i in range(model.spec.depth):
        b, blk = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        s[b + "norm1.weight"], s[b + "norm1.bias"] = T(p[blk + "LayerNorm_0/scale"]), T(p[blk + "LayerNorm_0/bias"])
        s[b + "norm2.weight"], s[b + "norm2.bias"] = T(p[blk + "LayerNorm_2/scale"]), T(p[blk + "LayerNorm_2/bias"])
        s[b + "attn.qkv.weight"] = torch.cat([T(p[f"{_attn(i)}/{n}/kernel"].reshape(d, d).T) for n in ("query", "key", "value")])
        s[b + "attn.qkv.bias"] = torch.cat([T(p[f"{_attn(i)}/{n}/bias"].reshape(d)) for n in ("query", "key", "value")])
        s[b + "attn.proj.weight"] = T(p[f"{_attn(i)}/out/kernel"].reshape(d, d).T)
        s[b + "attn.proj.bias"] = T(p[f"{_attn(i)}/out/bias"])
        for k, fc in ((0, "fc1"), (1, "fc2")):
            s[f"{b}mlp.{fc}.weight"] = T(p[f"{blk}MlpBlock_3/Dense_{k}/kernel"].T)
            s[f"{b}mlp.{fc}.bias"] = T(p[f"{blk}MlpBlock_3/Dense_{k}/bias"])
    return s
