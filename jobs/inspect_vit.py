"""Inspect a trained ViT the paper's ways (Figure 7, and attention maps as in Figure 6):

  filters.png              the first 28 principal components of the patch-embedding filters, as RGB patches
  posemb_similarity.png    cosine similarity of each patch's position embedding with every other's
  attention_distance.png   mean attention distance per head against depth, over a sample of images
  attention_rollout.png    attention rollout from the class token to the patches, laid over the images
  inspection.json          the numbers behind every figure (and the position embeddings' 2-D locality margin)

    python jobs/inspect_vit.py --checkpoint s3://bucket/vitray/runs/<run>/step_N --images s3://bucket/imagenet/val \\
        [--endpoint-url URL] [--out s3://bucket/vitray/inspect/<run>] [--num-images 16]
    python jobs/inspect_vit.py --checkpoint ViT-B_16.npz --images ./photos        # an official .npz
On a laptop: python jobs/inspect_vit.py --smoke   (pretrains the smoke model first, inspects it on the digits)

--images: a shard dataset (folder with manifest.json), a folder of .jpg/.png files or one image; without it, the
held-out digits. Needs no Ray (a handful of images through one model); prints the JSON's summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _size(text: str) -> int | tuple[int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="vitray checkpoint folder (local or s3://) or an official .npz")
    p.add_argument("--images", help="shards, image folder or image file (default: the held-out digits)")
    p.add_argument("--out", help="where the PNGs and inspection.json go (default ./inspect/<run>-<step>)")
    p.add_argument("--num-images", type=int, default=16, help="images averaged over for attention distance")
    p.add_argument("--rollout-images", type=int, default=8, help="images shown in the rollout figure")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"))
    p.add_argument("--image-size", type=_size, help="H or H,W (default: the checkpoint's; .npz: its square grid)")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--smoke", action="store_true", help="pretrain the smoke model (embedded S3, digits), then inspect")
    args = p.parse_args(argv)
    if not args.smoke and not args.checkpoint:
        p.error("give --checkpoint (or --smoke)")
    if args.num_images < 1:
        p.error("--num-images must be at least 1")

    from vitray import storage
    from vitray.eval.inspect import InspectionError, inspect, load_for_inspection, load_images

    try:
        with storage.embedded_unless("" if args.smoke else "given") as embedded:
            endpoint = embedded.endpoint if embedded else storage.Endpoint(url=args.endpoint_url)
            ckpt = args.checkpoint
            if args.smoke:
                from vitray.config import smoke
                from vitray.train import launch

                ckpt = launch.run(smoke(), embedded=embedded)["checkpoint"]
            model, meta = load_for_inspection(ckpt, endpoint, args.weights, args.image_size)
            out = args.out or os.path.join("inspect", "-".join(ckpt.rstrip("/").rsplit("/", 2)[-2:]).removesuffix(".npz"))
            size = (model.grid[0] * model.spec.patch, model.grid[1] * model.spec.patch)
            images, names = load_images(args.images, endpoint, args.num_images, size)
            report = inspect(model, images, out, endpoint if storage.is_s3(out) else None, meta, names,
                             args.rollout_images)
    except (InspectionError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": ckpt, "out": out, "figures": report["figures"],
                      "posemb_locality_margin": report["posemb"]["margin"],
                      "mean_attention_distance_per_layer": report["attention_distance"]["per_layer_mean"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
