"""Compute accounting: analytic FLOPs, accelerator peaks, MFU and accelerator-hours.

Conventions (ViT paper / paper-facts): a multiply-add is 2 FLOPs; training costs 3× the forward pass
(forward + backward for activations and weights); MFU = achieved model FLOP/s ÷ peak dense FLOP/s.
"""
from __future__ import annotations

import functools
import time

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


def vit_forward_flops(spec, image_size: int | tuple[int, int], num_classes: int, representation_size: int = 0) -> float:
    """Forward FLOPs for one image: 2·[patch embed + L·(12·N·D² + 2·N²·D) + pre-logits + head] with MLP ratio 4."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    n = spec.tokens((h, w))  # includes the class token
    d, m = spec.width, spec.mlp_dim
    patch = (n - 1) * 3 * spec.patch**2 * d
    per_layer = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * m  # qkv, QKᵀ and AV, out proj, MLP
    head = d * representation_size + (representation_size or d) * num_classes
    return 2.0 * (patch + spec.depth * per_layer + head)


def train_flops_per_image(forward_flops: float) -> float:
    return 3.0 * forward_flops


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(threads: int | None = None, n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul FLOP/s this process reaches with its torch threads: the CPU stand-in for a datasheet peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
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
