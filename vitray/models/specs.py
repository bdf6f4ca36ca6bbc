"""Architecture specs: the shape of each model family (ViT, hybrid, BiT ResNet, DETR, iGPT) and the facts about a
family that code outside `vitray/models` and `vitray/tasks` needs — what data it trains on, what its pretraining head
has, what inspection can read from it, which checkpoints initialise it. Pure Python (no torch), so configs validate
before anything heavy loads.

Those facts are class attributes of `ModelSpec`, not dataclass fields: two specs are equal when their shapes are, and
the config checks, the planner, checkpoints and inspection ask the spec instead of testing its family's name. The
families' modules (vit.py, resnet.py, detr.py, igpt.py) import this file; the registry, which names the specs and
builds their models, sits above them.
"""
from __future__ import annotations

import dataclasses


class ModelSpec:
    """What any spec answers. `kind` (set by each family, no default so a new one cannot forget it): the data it
    trains on — "classification" (image + class), "detection" (image + boxes) or "pixels" (the image itself) — which
    also picks its task (`vitray.tasks.TASKS`)."""

    kind: str
    # The paper's pretraining head has a tanh pre-logits layer as wide as the features (ViT, Sec. 3.1); BiT's has none.
    has_pre_logits_default = False
    # A class token attending over a 2-D grid of patches with learned position embeddings: what Figure 7's position-
    # embedding similarity, attention distance and rollout read.
    has_attention_maps = False
    # One linear filter per patch, whose principal components Figure 7 (left) shows; a hybrid's embedding is a ResNet.
    embeds_patches_linearly = False
    # The official vit_jax / big_vision .npz layout (embedding/kernel, Transformer/encoderblock_*) fits it.
    loads_released_npz = False
    # Image sides must be multiples of this (1: any resolution).
    size_multiple = 1

    @property
    def backbone_spec(self):
        """The spec of the classifier whose checkpoint initialises this model's backbone (DETR: a BiT ResNet), or None:
        fine-tuning keeps the architecture, so only a checkpoint of the same spec initialises it."""
        return None

    def accepts_backbone(self, source) -> bool:
        """Whether a checkpoint of `source` (a spec, or None when unknown) can initialise this model's backbone."""
        return self.backbone_spec is not None and source == self.backbone_spec


@dataclasses.dataclass(frozen=True)
class ViTSpec(ModelSpec):
    """One row of the paper's Table 1 plus a patch size."""

    width: int  # hidden size D
    depth: int  # layers
    mlp_dim: int
    heads: int
    patch: int
    family: str = "vit"

    kind = "classification"
    has_pre_logits_default = True
    has_attention_maps = True
    embeds_patches_linearly = True
    loads_released_npz = True

    def tokens(self, image_size: int | tuple[int, int]) -> int:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return (h // self.patch) * (w // self.patch) + 1  # + class token

    @property
    def features(self) -> int:  # width of the pooled representation (and of the pre-logits layer)
        return self.width

    @property
    def size_multiple(self) -> int:
        return self.patch


@dataclasses.dataclass(frozen=True)
class HybridSpec(ViTSpec):
    """A ViT whose patches are the 1×1 cells of a ResNet feature map (paper Sec. 3.1, Table 6). `resnet` blocks per
    stage: (3, 4, 9) is R50 with stage 4 folded into stage 3 (output stride 16), (3, 4, 6, 3) the full R50 (32)."""

    resnet: tuple[int, ...] = (3, 4, 9)
    resnet_width: int = 1
    family: str = "hybrid"

    embeds_patches_linearly = False
    loads_released_npz = False  # vitray reads the plain ViT layout only

    def __post_init__(self) -> None:
        assert self.patch == 4 * 2 ** (len(self.resnet) - 1), "patch must be the ResNet's output stride"


@dataclasses.dataclass(frozen=True)
class ResNetSpec(ModelSpec):
    """BiT ResNetV2: bottleneck blocks per stage and the width multiplier k of "R50x{k}"."""

    blocks: tuple[int, ...]
    width: int
    family: str = "bit"

    kind = "classification"
    size_multiple = 1  # any resolution; global pooling absorbs the grid

    @property
    def features(self) -> int:
        return 256 * self.width * 2 ** (len(self.blocks) - 1)

    @property
    def depth(self) -> int:  # "layers" for probes: the stem (0) and each stage
        return len(self.blocks)


@dataclasses.dataclass(frozen=True)
class DETRSpec(ModelSpec):
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

    kind = "detection"
    size_multiple = 1  # any resolution: the backbone's feature map sets the sequence length

    @property
    def stride(self) -> int:  # backbone output stride: stem 4, then ×2 per stage after the first
        return 4 * 2 ** (len(self.backbone) - 1)

    @property
    def features(self) -> int:
        return self.width

    @property
    def backbone_spec(self) -> ResNetSpec:
        """DETR pretrains its backbone as a BiT classifier of the same blocks and width (the paper's ImageNet R50)."""
        return ResNetSpec(blocks=self.backbone, width=self.backbone_width)


@dataclasses.dataclass(frozen=True)
class IGPTSpec(ModelSpec):
    """Image GPT (Chen et al. 2020): a GPT-2 decoder of `depth` pre-norm blocks over `vocab` palette tokens."""

    width: int
    depth: int
    heads: int
    vocab: int = 512  # the 9-bit colour palette
    bert: bool = False  # the paper's alternative objective: predict masked pixels, attention both ways
    family: str = "igpt"

    kind = "pixels"
    size_multiple = 1

    @property
    def mlp_dim(self) -> int:
        return 4 * self.width

    @property
    def features(self) -> int:
        return self.width


def representation_size(spec, pre_logits: bool) -> int | None:
    """The pretraining head's hidden width (paper Sec. 3.1: a tanh layer as wide as the features), or None."""
    return spec.features if pre_logits else None
