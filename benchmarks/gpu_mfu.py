"""bf16 train-step MFU on one GPU: ViT-B/16, L/16, H/14 at 224 and H/14 at 518, fused attention (SDPA), AdamW,
autocast bf16 over fp32 weights — the model as vitray trains it, without Ray or DeepSpeed in the timing.
Goal: ≥ 50 % MFU for L/16 and H/14. Runs in well under 8 minutes on an H100/H200; writes benchmarks/results/gpu_mfu.json.

    python benchmarks/gpu_mfu.py              # on a GPU machine
    python benchmarks/gpu_mfu.py --cpu-smoke  # the same code path with a tiny model on CPU (what CI runs)
"""
from __future__ import annotations

import argparse
import sys
import time

from common import write_result

# (model, resolution, batch per step): batches sized to keep an 80 GB device busy without running out.
CASES = [("vit_b16", 224, 256), ("vit_l16", 224, 128), ("vit_h14", 224, 64), ("vit_h14", 518, 8)]


def measure(name: str, size: int, batch: int, device: str, warmup: int, steps: int) -> dict:
    import torch

    from vitray import accounting
    from vitray.models.registry import build_model, get_spec

    torch.manual_seed(0)
    model = build_model(name, num_classes=1000, image_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    images = torch.randn(batch, 3, size, size, device=device)  # timing only: the values do not matter
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t) / steps
    flops = accounting.train_flops_per_image(accounting.forward_flops(get_spec(name), size, 1000))
    peak, source = accounting.peak_flops("", device == "cuda")
    row = {"model": name, "image_size": size, "batch": batch, "step_s": seconds, "images_per_s": batch / seconds,
           "mfu": batch * flops / seconds / peak, "peak_source": source,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    print(f"{name} @ {size}, batch {batch}: {row['images_per_s']:.1f} img/s, MFU {row['mfu']:.1%}", flush=True)
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    args = p.parse_args()
    import torch

    if args.cpu_smoke:
        measure("vit_tiny_test", 32, 4, "cpu", warmup=1, steps=2)
        return 0
    if not torch.cuda.is_available():
        print("error: no GPU; use --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = [measure(name, size, batch, "cuda", warmup=3, steps=10) for name, size, batch in CASES]
    write_result("gpu_mfu", {"what": "bf16 autocast train step (AdamW), fused SDPA, one GPU", "rows": rows,
                             "goal": "MFU >= 0.50 for vit_l16 and vit_h14"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
