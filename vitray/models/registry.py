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

# family → function(spec, **model kwargs) -> torch.nn.Module; filled by the modules that define the family.
BUILDERS: dict[str, Callable] = {}


def canonical(name: str) -> str:
    """`ViT-H/14` → `vit_h14`; unknown names raise KeyError listing what exists."""
    key = re.sub(r"[\s/\-]+", "", name.strip().lower()).replace("_", "")
    if not key.startswith("vit"):
        key = "vit" + key
    for known in MODELS:
        if known.replace("_", "") == key:
            return known
    raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")


def get_spec(name: str):
    return MODELS[canonical(name)]


def build_model(name: str, **kwargs):
    spec = get_spec(name)
    if spec.family not in BUILDERS:  # families register on import
        import vitray.models.vit  # noqa: F401
    return BUILDERS[spec.family](spec, **kwargs)
