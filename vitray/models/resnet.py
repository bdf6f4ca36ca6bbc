"""The paper's CNN baselines: BiT ResNetV2 (Kolesnikov et al., 2020) and the ResNet stem of the hybrids.

Both use Weight Standardisation + Group Normalisation (32 groups) instead of BatchNorm: statistics never cross
examples, so large-batch training across many devices needs no synchronised norms.

BiT ResNetV2 (pre-activation), width multiplier k, blocks per stage (3,4,6,3) for R50:
  image → StdConv 7×7/2 (64k) → pad 1, max-pool 3×3/2
        → 4 stages of pre-activation bottlenecks (GN → ReLU → conv), outputs 256k·2^s, stride on the 3×3 conv
        → GN → ReLU → global average pool (2048k) [→ pre-logits] → head (zero-init)

Hybrid stem (vit_jax's ResNet, post-activation bottlenecks as in ResNet v1.5, Sec. 3.1 "Hybrid Architecture"):
R50 with stage 4 removed and its 3 blocks moved to stage 3, i.e. (3, 4, 9): output stride 16, 1024 channels.
Its feature map is cut into 1×1 "patches" and projected to the transformer width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitray.models.partitioned import whole
from vitray.models.specs import ResNetSpec


class StdConv2d(nn.Conv2d):
    """Conv with weights standardised per output channel at every call (zero mean, unit variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv(cin: int, cout: int, k: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


class PreActBottleneck(nn.Module):
    """BiT's unit: GN → ReLU feed every conv; the projection shortcut reads the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.gn1, self.conv1 = gn(cin), conv(cin, mid, 1)
        self.gn2, self.conv2 = gn(mid), conv(mid, mid, 3, stride)
        self.gn3, self.conv3 = gn(mid), conv(mid, cout, 1)
        self.downsample = conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.gn2(out)))
        out = self.conv3(F.relu(self.gn3(out)))
        return out + shortcut


class Bottleneck(nn.Module):
    """vit_jax's hybrid unit: conv → GN → ReLU, the last GN zero-initialised so each block starts as identity."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        mid = cout // 4
        self.conv1, self.gn1 = conv(cin, mid, 1), gn(mid)
        self.conv2, self.gn2 = conv(mid, mid, 3, stride), gn(mid)
        self.conv3, self.gn3 = conv(mid, cout, 1), gn(cout)
        with whole(self.gn3):  # partitioned already under ZeRO-3's zero.Init (models/partitioned.py)
            nn.init.zeros_(self.gn3.weight)
        self.proj = nn.Sequential(conv(cin, cout, 1, stride), gn(cout)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(x) if self.proj is not None else x
        out = F.relu(self.gn1(self.conv1(x)))
        out = F.relu(self.gn2(self.conv2(out)))
        return F.relu(self.gn3(self.conv3(out)) + shortcut)


def _stages(unit, blocks: tuple[int, ...], width: int) -> tuple[nn.ModuleList, int]:
    stages, cin = nn.ModuleList(), 64 * width
    for s, n in enumerate(blocks):
        cout = 256 * width * 2**s
        stages.append(nn.Sequential(*(unit(cin if i == 0 else cout, cout, (1 if s == 0 else 2) if i == 0 else 1)
                                      for i in range(n))))
        cin = cout
    return stages, cin


class ResNetV2(nn.Module):
    """BiT ResNetV2. Same interface as ViT: forward, forward_features (pooled pre-logits), layer_features (stages)."""

    def __init__(self, spec: ResNetSpec, num_classes: int, image_size: int | tuple[int, int] = 224,
                 dropout: float = 0.0, representation_size: int | None = None):
        super().__init__()
        self.spec, self.num_classes = spec, num_classes
        self.root = conv(3, 64 * spec.width, 7, stride=2)
        self.stages, channels = _stages(PreActBottleneck, spec.blocks, spec.width)
        self.norm = gn(channels)
        self.pre_logits = nn.Sequential(nn.Linear(channels, representation_size), nn.Tanh()) if representation_size else nn.Identity()
        self.head = nn.Linear(representation_size or channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                with whole(m):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        with whole(self.pre_logits, self.head):
            if representation_size:
                nn.init.trunc_normal_(self.pre_logits[0].weight, std=math.sqrt(1.0 / channels) / 0.8796)
                nn.init.zeros_(self.pre_logits[0].bias)
            nn.init.zeros_(self.head.weight)  # BiT: the head starts at zero
            nn.init.zeros_(self.head.bias)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(self.root(images), (1, 1, 1, 1)), kernel_size=3, stride=2)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's normalised output (B, C, H/s, W/s), before pooling: what DETR's backbone hands on."""
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        return F.relu(self.norm(x))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(self.feature_map(images).mean((2, 3)))

    def layer_features(self, images: torch.Tensor, layers: list[int], pool: str = "mean") -> list[torch.Tensor]:
        """Globally average-pooled output of stage k (k = 0: the stem). `pool` is accepted for ViT's interface;
        a CNN has no [class] token, so only "mean" is valid."""
        if pool != "mean":
            raise ValueError(f"pool: {pool!r}; a ResNet's features can only be mean-pooled")
        bad = [k for k in layers if not 0 <= k <= len(self.stages)]
        if bad:
            raise ValueError(f"layer {bad[0]}: this model has layers 0..{len(self.stages)}")
        x, out = self.stem(images), {}
        for k in range(max(layers, default=0) + 1):
            if k > 0:
                x = self.stages[k - 1](x)
            if k in layers:
                out[k] = x.mean((2, 3))
        return [out[k] for k in layers]

    def adapt_for_finetuning(self, num_classes: int, image_size, posemb_method: str = "bilinear") -> "ResNetV2":
        """BiT-HyperRule transfer: a fresh zero-initialised head; a CNN needs nothing else for a new resolution."""
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.norm.num_channels, num_classes).to(self.head.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


class HybridStem(nn.Module):
    """The hybrid's patch embedding: ResNet stages (output stride 16 for 3 stages) → 1×1 conv to the width."""

    def __init__(self, blocks: tuple[int, ...], width: int, dim: int):
        super().__init__()
        self.root, self.root_norm = conv(3, 64 * width, 7, stride=2), gn(64 * width)
        self.stages, channels = _stages(Bottleneck, blocks, width)
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)  # the "1×1 patches" of the feature map
        for m in self.modules():
            if isinstance(m, StdConv2d):
                with whole(m):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.root_norm(self.root(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for stage in self.stages:
            x = stage(x)
        return self.proj(x)
