"""Compute accounting: analytic FLOPs, accelerator peaks, MFU and accelerator-hours.

Conventions (ViT paper / paper-facts): a multiply-add is 2 FLOPs; training costs 3× the forward pass
(forward + backward for activations and weights); MFU = achieved model FLOP/s ÷ peak dense FLOP/s.
"""
from __future__ import annotations

import functools
import time

from vitray.models.specs import DETRSpec, HybridSpec, IGPTSpec, ResNetSpec, ViTSpec, representation_size

# Peak dense bf16 FLOP/s per accelerator (vendor datasheets; TPUv3: 123 T per chip, 2 cores per chip).
PEAK_FLOPS = {
    "TPUv3-core": 61.5e12,
    "V100": 125e12,  # fp16 tensor cores
    "A10G": 70e12,
    "L4": 121e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
}


def _side(image_size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _conv(cin: int, cout: int, k: int, hw: tuple[int, int], stride: int = 1,
          skip_padding: bool = False) -> tuple[float, tuple[int, int]]:
    """FLOPs and output grid of a k×k convolution over an `hw` input with "same"-style padding k // 2, as the
    models use. Dense counting (the default) charges every kernel tap, as FlopCounterMode and the hardware do;
    `skip_padding` charges only the taps that land inside the input — XLA's HloCostAnalysis rule, which is how
    the paper's Table 6 counted: it makes 3×3 convolutions on a 7×7 map 18 % cheaper and BiT ResNets ~4 %."""
    taps, out = [], []
    for n in hw:
        o = (n + 2 * (k // 2) - k) // stride + 1
        out.append(o)
        taps.append(sum(0 <= i * stride - k // 2 + t < n for i in range(o) for t in range(k)) if skip_padding
                    else o * k)
    return 2.0 * cin * cout * taps[0] * taps[1], (out[0], out[1])


def _resnet_flops(blocks: tuple[int, ...], width: int, image_size,
                  skip_padding: bool = False) -> tuple[float, tuple[int, int], int]:
    """(FLOPs, output grid, output channels) of the stem + bottleneck stages shared by BiT and the hybrids: the
    convolutions only (norms, activations and pooling are not multiply-adds and FlopCounterMode skips them too)."""
    flops, hw = _conv(3, 64 * width, 7, _side(image_size), 2, skip_padding)
    hw = ((hw[0] + 2 - 3) // 2 + 1, (hw[1] + 2 - 3) // 2 + 1)  # 3×3/2 max-pool, padding 1
    cin = 64 * width
    for s, n in enumerate(blocks):
        cout, mid = 256 * width * 2**s, 64 * width * 2**s
        for i in range(n):
            stride = (1 if s == 0 else 2) if i == 0 else 1
            reduce, _ = _conv(cin, mid, 1, hw)
            spatial, out = _conv(mid, mid, 3, hw, stride, skip_padding)
            expand, _ = _conv(mid, cout, 1, out)
            flops += reduce + spatial + expand
            if stride != 1 or cin != cout:
                flops += _conv(cin, cout, 1, hw, stride)[0]  # projection shortcut
            hw, cin = out, cout
    return flops, hw, cin


def _transformer_flops(spec, n: int, last_queries: int | None = None) -> float:
    """L encoder blocks over n tokens: qkv, QKᵀ and AV, output projection, MLP (2 FLOPs per multiply-add).
    `last_queries`: the last block computes only that many tokens' outputs (qkv still for all n)."""
    d, m = spec.width, spec.mlp_dim

    def block(q: int) -> float:
        return n * d * 3 * d + 2 * q * n * d + q * d * d + 2 * q * d * m

    return 2.0 * ((spec.depth - 1) * block(n) + block(last_queries or n))


def vit_forward_flops(spec, image_size: int | tuple[int, int], num_classes: int, representation_size: int = 0,
                      paper: bool = False) -> float:
    """Forward FLOPs for one image: 2·[patch embed + L·(12·N·D² + 2·N²·D) + pre-logits + head] with MLP ratio 4,
    less what vitray's last block skips (it computes only the class token: `ViT.encode`) unless `paper`.
    Hybrids replace the patch embedding by their ResNet and a 1×1 projection of its feature map."""
    h, w = _side(image_size)
    d = spec.width
    if isinstance(spec, HybridSpec):
        embed, grid, channels = _resnet_flops(spec.resnet, spec.resnet_width, (h, w), skip_padding=paper)
        embed += _conv(channels, d, 1, grid)[0]
        n = grid[0] * grid[1] + 1
    else:
        n = spec.tokens((h, w))  # includes the class token
        embed = 2.0 * (n - 1) * 3 * spec.patch**2 * d
    head = 2.0 * (d * representation_size + (representation_size or d) * num_classes)
    return embed + _transformer_flops(spec, n, None if paper else 1) + head


def resnet_forward_flops(spec, image_size: int | tuple[int, int], num_classes: int, representation_size: int = 0,
                         paper: bool = False) -> float:
    flops, _, channels = _resnet_flops(spec.blocks, spec.width, image_size, skip_padding=paper)
    return flops + 2.0 * (channels * representation_size + (representation_size or channels) * num_classes)


def detr_forward_flops(spec, image_size: int | tuple[int, int], num_classes: int, representation_size: int = 0,
                       paper: bool = False) -> float:
    """Backbone and 1×1 projection; encoder self-attention over the n = h·w feature cells; decoder self-attention
    over the Q queries and cross-attention from them to the n cells; FFNs; class and box heads on every decoder
    layer (the auxiliary outputs are computed too)."""
    flops, grid, channels = _resnet_flops(spec.backbone, spec.backbone_width, image_size, skip_padding=paper)
    d, m, q = spec.width, spec.mlp_dim, spec.queries
    n = grid[0] * grid[1]
    flops += _conv(channels, d, 1, grid)[0]
    encoder = 2.0 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    self_attn = 4 * q * d * d + 2 * q * q * d
    cross_attn = 2 * q * d * d + 2 * n * d * d + 2 * q * n * d
    heads = d * (num_classes + 1) + 2 * d * d + 4 * d
    decoder = 2.0 * (self_attn + cross_attn + 2 * q * d * m + q * heads)
    return flops + spec.encoder_depth * encoder + spec.depth * decoder


def igpt_forward_flops(spec, image_size: int | tuple[int, int], num_classes: int = 0, representation_size: int = 0,
                       paper: bool = False) -> float:
    """One token per pixel: the transformer over n = H·W tokens (causal attention still computes the full n×n
    scores in the fused kernel's count), the palette head, and the nearest-colour search of the quantiser."""
    h, w = _side(image_size)
    n = h * w
    return _transformer_flops(spec, n) + 2.0 * n * spec.width * spec.vocab + 2.0 * n * spec.vocab * 3


# spec class → its forward-FLOPs count (a hybrid is a ViT whose patch embedding is a ResNet: `vit_forward_flops`).
FORWARD_FLOPS = {ViTSpec: vit_forward_flops, HybridSpec: vit_forward_flops, ResNetSpec: resnet_forward_flops,
                 DETRSpec: detr_forward_flops, IGPTSpec: igpt_forward_flops}


def forward_flops(spec, image_size: int | tuple[int, int], num_classes: int, pre_logits: bool = False,
                  paper: bool = False) -> float:
    """Analytic forward FLOPs per image of any registered model (`pre_logits`: with the pretraining tanh layer).
    By default what vitray's model computes (FlopCounterMode's count; MFU uses it). `paper`: as the ViT paper's
    Table 6 counted — XLA's rule of not charging convolution taps on padding (see `_conv`), and every token
    through every block."""
    return FORWARD_FLOPS[type(spec)](spec, image_size, num_classes, representation_size(spec, pre_logits) or 0, paper)


def train_flops_per_image(forward_flops: float) -> float:
    return 3.0 * forward_flops


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(threads: int | None = None, n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul FLOP/s this process reaches with its torch threads: the CPU stand-in for a datasheet peak."""
    import torch

    g = torch.Generator().manual_seed(0)  # not the global RNG: training's dropout draws must not depend on this
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(accelerator: str, on_gpu: bool) -> tuple[float, str]:
    """(peak FLOP/s per worker, where that number comes from)."""
    if accelerator:
        for name, peak in PEAK_FLOPS.items():
            if name.lower() in accelerator.lower():
                return peak, f"{name} datasheet bf16"
    if on_gpu:
        import torch

        gpu = torch.cuda.get_device_name()
        for name, peak in PEAK_FLOPS.items():
            if name.lower() in gpu.lower():
                return peak, f"{name} datasheet bf16"
        return float("nan"), f"{gpu}: peak unknown (add it to PEAK_FLOPS)"
    return measured_cpu_peak(), "CPU: measured fp32 matmul peak of this worker"
