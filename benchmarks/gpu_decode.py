"""`data.decode_on=gpu` on one GPU: images/s of the worker-side decode (nvJPEG batched through torchvision's
`decode_jpeg`, then crop, k×k averaging, bilinear resize, flip: `vitray/data/device_decode.py`) against one CPU
core doing the same with libjpeg-turbo (simplejpeg, or torchvision's CPU `decode_jpeg` where simplejpeg is not
installed), side by side on the same JPEGs. Plain
torch + torchvision: no Ray, no DeepSpeed (what the lent GPU machine has). Writes benchmarks/results/gpu_decode.json.

    PYTHONPATH=. python benchmarks/gpu_decode.py               # on a GPU machine
    PYTHONPATH=. python benchmarks/gpu_decode.py --cpu-smoke   # the same code path, a few images on CPU
"""
from __future__ import annotations

import argparse
import io
import math
import time

import numpy as np
from common import write_result


def photos(count: int, side: int, rng: np.random.Generator) -> list[bytes]:
    """JPEGs at `side` px wide (4:3), from the sklearn sample photos when installed, else smooth random fields."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images

        sources = [Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:  # the GPU machine may lack sklearn: low-frequency noise compresses like a photo
        sources = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)]
    out = []
    for i in range(count):
        buf = io.BytesIO()
        sources[i % len(sources)].resize((side, side * 3 // 4), Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def shipped(jpegs: list[bytes], size: int, rng: np.random.Generator) -> dict:
    """A batch as the Ray Data tasks ship it: the files, inception crops (5–100 % area, aspect 3/4–4/3), flips."""
    from PIL import Image

    boxes = []
    for data in jpegs:
        w, h = Image.open(io.BytesIO(data)).size
        area, aspect = w * h * rng.uniform(0.05, 1), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
        boxes.append((int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch))
    return {"encoded": np.array(jpegs + [b""], dtype=object)[:-1], "kind": np.ones(len(jpegs), np.int8),
            "box": np.asarray(boxes, np.int32), "flip": rng.random(len(jpegs)) < 0.5}


def rate(batch: dict, size: int, device, rounds: int) -> float:
    import torch

    from vitray.data import device_decode

    device_decode.decode_batch(batch, size, device)  # warm-up: nvJPEG handles, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(rounds):
        device_decode.decode_batch(batch, size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rounds * len(batch["encoded"]) / (time.perf_counter() - t)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    gpu = torch.device("cuda") if torch.cuda.is_available() and not args.cpu_smoke else None
    batch_size, rounds = (8, 1) if args.cpu_smoke else (256, 5)
    results = {}
    for name, side in (("imagenet", 500), ("large", 2048)):
        batch = shipped(photos(batch_size, side, rng), 224, rng)
        row = {"jpeg_bytes_mean": float(np.mean([len(b) for b in batch["encoded"]])),
               "cpu_core_images_per_s": rate(batch, 224, torch.device("cpu"), rounds)}
        if gpu is not None:
            row["gpu_images_per_s"] = rate(batch, 224, gpu, rounds)
            row["gpu_over_cpu_core"] = row["gpu_images_per_s"] / row["cpu_core_images_per_s"]
        results[name] = row
        print(name, {k: round(v, 1) for k, v in row.items()}, flush=True)
    if not args.cpu_smoke:
        write_result("gpu_decode", {"what": "worker-side decode + crop + resize + flip, images/s: nvJPEG batch of 256"
                                    " vs one CPU core (libjpeg-turbo), 224 px crops", "device": str(gpu or "cpu"),
                                    **results})


if __name__ == "__main__":
    main()
