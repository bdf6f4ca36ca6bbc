"""Model names → architecture specs. Pure Python (no torch) so configs validate before anything heavy loads.

Names are forgiving: `vit_h14`, `vit-h/14`, `ViT-H/14` and `h14` all resolve to the same model.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """One row of the paper's Table 1 plus a patch size."""

    width: int  # hidden size D
    depth: int  # layers
    mlp_dim: int
    heads: int
    patch: int
    family: str = "vit"

    def tokens(self, image_size: int | tuple[int, int]) -> int:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return (h // self.patch) * (w // self.patch) + 1  # + class token

    @property
    def features(self) -> int:  # width of the pooled representation (and of the pre-logits layer)
        return self.width

    @property
    def size_multiple(self) -> int:  # image sides must be multiples of this
        return self.patch


@dataclasses.dataclass(frozen=True)
class HybridSpec(ViTSpec):
    """A ViT whose patches are the 1×1 cells of a ResNet feature map (paper Sec. 3.1, Table 6). `resnet` blocks per
    stage: (3, 4, 9) is R50 with stage 4 folded into stage 3 (output stride 16), (3, 4, 6, 3) the full R50 (32)."""

    resnet: tuple[int, ...] = (3, 4, 9)
    resnet_width: int = 1
    family: str = "hybrid"

    def __post_init__(self) -> None:
        assert self.patch == 4 * 2 ** (len(self.resnet) - 1), "patch must be the ResNet's output stride"


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """BiT ResNetV2: bottleneck blocks per stage and the width multiplier k of "R50x{k}"."""

    blocks: tuple[int, ...]
    width: int
    family: str = "bit"

    @property
    def features(self) -> int:
        return 256 * self.width * 2 ** (len(self.blocks) - 1)

    @property
    def depth(self) -> int:  # "layers" for probes: the stem (0) and each stage
        return len(self.blocks)

    size_multiple = 1  # any resolution; global pooling absorbs the grid


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

@dataclasses.dataclass(frozen=True)
class DETRSpec:
    """DETR (Carion et al. 2020): a ResNet backbone (blocks per stage, width multiplier) projected to `width`, an
    encoder of `encoder_depth` and a decoder of `depth` post-norm layers, `queries` object queries."""

    width: int = 256  # d
    depth: int = 6  # decoder layers
    encoder_depth: int = 6
    mlp_dim: int = 2048
    heads: int = 8
    queries: int = 100
    backbone: tuple[int, ...] = (3, 4, 6, 3)
    backbone_width: int = 1
    family: str = "detr"

    @property
    def stride(self) -> int:  # backbone output stride: stem 4, then ×2 per stage after the first
        return 4 * 2 ** (len(self.backbone) - 1)

    @property
    def features(self) -> int:
        return self.width

    size_multiple = 1  # any resolution: the backbone's feature map sets the sequence length


# DETR's paper defaults (R50 backbone, 6 + 6 layers, d = 256, FFN 2048, 8 heads, 100 queries) and a CPU-sized one for
# digit canvases: two ResNet stages (output stride 8), 2 + 2 layers, width 64, 10 queries.
MODELS["detr_r50"] = DETRSpec()
MODELS["detr_r101"] = DETRSpec(backbone=(3, 4, 23, 3))
MODELS["detr_smoke"] = DETRSpec(width=64, depth=2, encoder_depth=2, mlp_dim=256, heads=4, queries=10, backbone=(1, 1))

@dataclasses.dataclass(frozen=True)
class IGPTSpec:
    """Image GPT (Chen et al. 2020): a GPT-2 decoder of `depth` pre-norm blocks over `vocab` palette tokens."""

    width: int
    depth: int
    heads: int
    vocab: int = 512  # the 9-bit colour palette
    bert: bool = False  # the paper's alternative objective: predict masked pixels, attention both ways
    family: str = "igpt"

    @property
    def mlp_dim(self) -> int:
        return 4 * self.width

    @property
    def features(self) -> int:
        return self.width

    size_multiple = 1


# iGPT paper Sec. 3.2: S, M and L at 32×32 (the sequence is 1024 tokens); a CPU-sized one for 8×8 digits.
MODELS["igpt_s"] = IGPTSpec(width=512, depth=24, heads=8)
MODELS["igpt_m"] = IGPTSpec(width=1024, depth=36, heads=8)
MODELS["igpt_l"] = IGPTSpec(width=1536, depth=48, heads=16)
MODELS["igpt_smoke"] = IGPTSpec(width=64, depth=4, heads=4, vocab=16)
for _name in ("igpt_s", "igpt_m", "igpt_l", "igpt_smoke"):  # the same sizes trained with the BERT objective
    MODELS[f"{_name}_bert"] = dataclasses.replace(MODELS[_name], bert=True)

# family → function(spec, **model kwargs) -> torch.nn.Module; filled by the modules that define the family.
BUILDERS: dict[str, Callable] = {}


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


def representation_size(spec, pre_logits: bool) -> int | None:
    """The pretraining head's hidden width (paper Sec. 3.1: a tanh layer as wide as the features), or None."""
    return spec.features if pre_logits else None


def build_model(name: str, pre_logits: bool | None = None, **kwargs):
    """The model `name` names. `pre_logits` (a config's model.pre_logits) sets the head's hidden layer by the
    paper's rule; or pass `representation_size` directly."""
    spec = get_spec(name)
    if pre_logits is not None:
        kwargs["representation_size"] = representation_size(spec, pre_logits)
    if spec.family not in BUILDERS:  # families register on import
        import vitray.models.detr  # noqa: F401
        import vitray.models.igpt  # noqa: F401
        import vitray.models.resnet  # noqa: F401
        import vitray.models.vit  # noqa: F401
    return BUILDERS[spec.family](spec, **kwargs)
