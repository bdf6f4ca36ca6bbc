"""Model names → architecture specs (`vitray.models.specs`) → the modules that build them. Pure Python (no torch)
until a model is built, so configs validate before anything heavy loads.

Names are forgiving: `vit_h14`, `vit-h/14`, `ViT-H/14` and `h14` all resolve to the same model. The registry sits
above the families: it imports their modules (when a model is built), they import only the specs.
"""
from __future__ import annotations

import dataclasses
import re

from vitray.models.specs import DETRSpec, HybridSpec, IGPTSpec, ResNetSpec, ViTSpec, representation_size

# ViT paper, Table 1 (Ti and S from DeiT / the AugReg follow-up, same layout).
_VIT_SIZES = {
    "ti": dict(width=192, depth=12, mlp_dim=768, heads=3),
    "s": dict(width=384, depth=12, mlp_dim=1536, heads=6),
    "b": dict(width=768, depth=12, mlp_dim=3072, heads=12),
    "l": dict(width=1024, depth=24, mlp_dim=4096, heads=16),
    "h": dict(width=1280, depth=32, mlp_dim=5120, heads=16),
}

MODELS: dict[str, object] = {
    f"vit_{size}{patch}": ViTSpec(patch=patch, **dims) for size, dims in _VIT_SIZES.items() for patch in (32, 16, 14)
}
# Tiny models for tests and CPU smoke runs: same code path, minutes instead of accelerator-days.
MODELS["vit_tiny_test"] = ViTSpec(width=32, depth=2, mlp_dim=64, heads=2, patch=8)
MODELS["vit_smoke"] = ViTSpec(width=64, depth=4, mlp_dim=128, heads=4, patch=4)
MODELS["vit_smoke_s"] = ViTSpec(width=32, depth=2, mlp_dim=64, heads=2, patch=4)  # the smoke scaling study's small ViT

# BiT ResNetV2 baselines (paper Table 2 and 6; R152x4 is BiT-L). R200's blocks as in He et al. 2016 (v2).
_RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
for _depth, _width in ((50, 1), (50, 2), (101, 1), (152, 1), (152, 2), (200, 3), (152, 4)):
    MODELS[f"bit_r{_depth}x{_width}"] = ResNetSpec(blocks=_RESNET_BLOCKS[_depth], width=_width)
MODELS["bit_tiny_test"] = ResNetSpec(blocks=(1, 1), width=1)
MODELS["bit_smoke_s"] = ResNetSpec(blocks=(1, 1), width=1)  # the smoke scaling study's two BiT sizes
MODELS["bit_smoke"] = ResNetSpec(blocks=(1, 1, 1), width=1)

# Hybrids (Table 6): "/16" folds R50's stage 4 into stage 3, "/32" keeps all four stages.
for _size in ("b", "l"):
    MODELS[f"r50_vit_{_size}16"] = HybridSpec(patch=16, resnet=(3, 4, 9), **_VIT_SIZES[_size])
    MODELS[f"r50_vit_{_size}32"] = HybridSpec(patch=32, resnet=(3, 4, 6, 3), **_VIT_SIZES[_size])
MODELS["hybrid_tiny_test"] = HybridSpec(width=32, depth=2, mlp_dim=64, heads=2, patch=8, resnet=(1, 1))

# DETR's paper defaults (R50 backbone, 6 + 6 layers, d = 256, FFN 2048, 8 heads, 100 queries) and a CPU-sized one for
# digit canvases: two ResNet stages (output stride 8), 2 + 2 layers, width 64, 10 queries.
MODELS["detr_r50"] = DETRSpec()
MODELS["detr_r101"] = DETRSpec(backbone=(3, 4, 23, 3))
MODELS["detr_smoke"] = DETRSpec(width=64, depth=2, encoder_depth=2, mlp_dim=256, heads=4, queries=10, backbone=(1, 1))

# iGPT paper Sec. 3.2: S, M and L at 32×32 (the sequence is 1024 tokens); a CPU-sized one for 8×8 digits.
MODELS["igpt_s"] = IGPTSpec(width=512, depth=24, heads=8)
MODELS["igpt_m"] = IGPTSpec(width=1024, depth=36, heads=8)
MODELS["igpt_l"] = IGPTSpec(width=1536, depth=48, heads=16)
MODELS["igpt_smoke"] = IGPTSpec(width=64, depth=4, heads=4, vocab=16)
for _name in ("igpt_s", "igpt_m", "igpt_l", "igpt_smoke"):  # the same sizes trained with the BERT objective
    MODELS[f"{_name}_bert"] = dataclasses.replace(MODELS[_name], bert=True)


def canonical(name: str) -> str:
    """`ViT-H/14` → `vit_h14`, `BiT-R50x1` and `R50x1` → `bit_r50x1`, `R50+ViT-B/16` → `r50_vit_b16`; unknown
    names raise KeyError listing what exists."""
    key = re.sub(r"[\s/\-+_]+", "", name.strip().lower())
    for candidate in (key, "vit" + key, "bit" + key):
        for known in MODELS:
            if known.replace("_", "") == candidate:
                return known
    raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")


def get_spec(name: str):
    return MODELS[canonical(name)]


def build_model(name: str, pre_logits: bool | None = None, **kwargs):
    """The model `name` names. `pre_logits` (a config's model.pre_logits) sets the head's hidden layer by the
    paper's rule; or pass `representation_size` directly."""
    spec = get_spec(name)
    if pre_logits is not None:
        kwargs["representation_size"] = representation_size(spec, pre_logits)
    return builder(spec)(spec, **kwargs)


def builder(spec):
    """The class (spec, **model kwargs) -> torch.nn.Module that builds `spec`, chosen by the spec's class."""
    # Imported here, not at the top: naming and validating a model must not load torch.
    from vitray.models import detr, igpt, resnet, vit

    return {ViTSpec: vit.ViT, HybridSpec: vit.ViT, ResNetSpec: resnet.ResNetV2, DETRSpec: detr.DETR,
            IGPTSpec: igpt.IGPT}[type(spec)]
