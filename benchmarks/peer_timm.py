"""vitray's ViT against timm's implementation of the same configuration: train-step images/s (forward, backward,
AdamW step) at Ti/16, S/16 and B/16, single steps alternating between the two in one process, as a ratio
(vitray ÷ timm; goal ≥ 1.0). Both use fused attention (SDPA), class token, no pre-logits, a 1000-class head.
vitray's last block computes only the class token's output (exact: see `ViT.encode`); timm computes all tokens.

    pip install torch==2.14.1 torchvision==0.29.1 -e ".[bench]"   # timm needs torchvision
    python benchmarks/peer_timm.py [--size 224] [--batch 8] [--steps 30 30 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import write_result

PAIRS = [("vit_ti16", "vit_tiny_patch16_224"), ("vit_s16", "vit_small_patch16_224"), ("vit_b16", "vit_base_patch16_224")]


def trainer(model, images, labels):
    """One timed train step (forward, backward, AdamW) per call, in seconds."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = images.device.type
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        t = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, nargs=3, default=(30, 30, 10), metavar=("TI", "S", "B"),
                   help="timed steps per side for Ti/16, S/16, B/16")
    args = p.parse_args()
    import torch

    try:
        import timm
    except ImportError:
        print('error: timm is not installed: pip install torch==2.14.1 torchvision==0.29.1 -e ".[bench]"', file=sys.stderr)
        return 2
    from vitray.models.registry import build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for (ours, theirs), steps in zip(PAIRS, args.steps):
        torch.manual_seed(0)
        a = build_model(ours, num_classes=1000, image_size=args.size).to(device)
        b = timm.create_model(theirs, num_classes=1000, img_size=args.size).to(device)
        params = (sum(x.numel() for x in a.parameters()), sum(x.numel() for x in b.parameters()))
        assert params[0] == params[1], f"{ours} vs {theirs}: {params} parameters — not the same configuration"
        images = torch.randn(args.batch, 3, args.size, args.size, device=device)
        labels = torch.randint(0, 1000, (args.batch,), device=device)
        step_a, step_b = trainer(a, images, labels), trainer(b, images, labels)
        step_a(), step_b()  # warm-up
        t_ours, t_timm = [], []
        for _ in range(steps):  # alternating single steps: machine noise and drift hit both sides alike
            t_ours.append(step_a())
            t_timm.append(step_b())
        ratios = [tb / ta for ta, tb in zip(t_ours, t_timm)]  # > 1: vitray faster
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        row = {"vitray": ours, "timm": theirs, "params": params[0], "steps": steps,
               "vitray_images_per_s": args.batch / statistics.median(t_ours),
               "timm_images_per_s": args.batch / statistics.median(t_timm),
               "ratio_median": median, "ratio_quartiles": [q1, q3]}
        print(f"{ours} vs timm {theirs}: {row['vitray_images_per_s']:.2f} vs {row['timm_images_per_s']:.2f} img/s → "
              f"{median:.2f}× (quartiles {q1:.2f}–{q3:.2f}, {steps} step pairs)", flush=True)
        rows.append(row)
    write_result("peer_timm", {"what": f"train step (AdamW) images/s, {args.size} px, batch {args.batch}, {device}",
                               "timm": timm.__version__, "rows": rows, "goal": "ratio >= 1.0"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
