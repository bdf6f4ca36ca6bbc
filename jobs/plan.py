"""The cost planner: what a configuration needs before it runs — memory per device (ZeRO's formulas for parameters,
gradients and Adam states, plus measured activations), FLOPs, accelerator-days and wall-clock at a given MFU.
Refuses (exit 2) a configuration that cannot fit on its accelerator. Starts no Ray and no accelerator.

    python jobs/plan.py --preset h14_jft --set scaling.num_workers=1024 --set optim.micro_batch=4 --accelerator H100
    python jobs/plan.py --preset l16_i21k --set deepspeed.zero_stage=3 --accelerator A100 --mfu 0.45 --json
    python jobs/plan.py --preset b16_jft --set model.name=bit_r152x2     # any registered model (--model = this)

Any job's preset (pretraining, fine-tuning, DETR, iGPT): `--preset h14_imagenet`, or `--preset finetune:smoke` where
two jobs share a name (JOB: the job's script, jobs/JOB.py). The dataset size comes from the dataset the preset names (jft 303M, i21k 14.2M, imagenet 1.28M,
cifar10 50k, coco 118k images, ...) unless --images. A GPU recipe is planned on H100s unless --accelerator (or
scaling.accelerator) names another. --json prints the same plan for machines.

The data line: the images/s the accelerators consume at that MFU, the CPUs needed to decode them and whether the
cluster has them. The decode rate is measured for a few seconds on the first samples of a few shards of
data.train_uri when it is set (the same decode + crop + flip as training, one core, before anything starts):

    python jobs/plan.py --preset b16_i21k --accelerator H100 --set scaling.num_workers=64 \
        --set data.train_uri=s3://bucket/i21k/train [--node-cpus 192] [--data-cpus 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="h14_jft", help="any job's preset, or JOB:NAME (pretrain_vit_h14, finetune, train_detr, pretrain_igpt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--model", help="= model.name (ViT, BiT ResNet or hybrid)")
    p.add_argument("--accelerator", help="= scaling.accelerator, e.g. H100, A100, TPUv3-core")
    p.add_argument("--images", type=float, help="images per epoch (default: the preset's dataset)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to plan with (default 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--decode-rate", type=float, help="images/s one CPU decodes (default: measured on data.train_uri"
                   " when set, else ImageNet-sized JPEGs' rate)")
    p.add_argument("--node-cpus", type=float, help="CPUs per accelerator node (default: the cloud instance that"
                   " carries 8 of --accelerator, e.g. 192 for H100)")
    p.add_argument("--data-cpus", type=float, default=0.0, help="CPUs on CPU-only data nodes (default 0)")
    p.add_argument("--rehearsal", metavar="PATH", help="a rehearsal.json, or a rehearsals.jsonl whose newest row of the"
                   " model and resolution is used, for the measured save stall, restart and resize (default: the"
                   " newest such row beside the runs or in benchmarks/results/; 'none': modelled figures only)")
    args = p.parse_args(argv)

    from vitray import cost
    from vitray.config import ConfigError, apply_overrides, validate
    from vitray.config.recipes import find_preset, train_images
    from vitray.data.manifest import DataError

    extra = [f"model.name={args.model}"] if args.model else []
    extra += [f"scaling.accelerator={args.accelerator}"] if args.accelerator else []
    try:
        _, cfg = find_preset(args.preset)
        cfg = apply_overrides(cfg, args.overrides + extra)
        assumed = cfg.scaling.use_gpu and not cfg.scaling.accelerator  # the paper's GPUs are unnamed: plan on H100s
        if assumed:
            cfg = cfg.replace(scaling=dict(accelerator=DEFAULT_ACCELERATOR))
        validate(cfg if cfg.data.train_uri or cfg.data.builtin else cfg.replace(data=dict(train_uri="planned")))
        images = args.images or train_images(args.preset)
        if images is None:
            raise ConfigError(f"--images: preset {args.preset!r} names no paper dataset; give the images per epoch")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu: {args.mfu} is not in (0, 1]")
        estimate = cost.estimate(cfg, images, args.mfu, host=not cfg.scaling.use_gpu)
        rate, source = decode_rate(cfg, args.decode_rate)
        data = cost.data_plan(cfg, estimate, rate, source, args.node_cpus, args.data_cpus)
        good = run_goodput(cfg, estimate, args.rehearsal)
        if args.json:
            print(json.dumps({**estimate.to_dict(), "accelerator_assumed": assumed,
                              "data": data.to_dict() if data else None, "goodput": good.to_dict(*_timing(cfg, estimate))}))
        else:
            print(table(estimate, data, assumed, good, cfg))
        cost.check_fits(estimate)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


DEFAULT_ACCELERATOR = "H100"


def table(est, data, assumed: bool, good=None, cfg=None) -> str:
    """The plan at a glance: one row per question a person asks before launching."""
    from vitray.cost import GIB

    cap = f" of {est.device_memory / GIB:.0f}" if est.device_memory else ""
    parts = ", ".join(f"{k} {v / GIB:.3g}" for k, v in est.memory.items())
    rows = [("run", f"{est.model} @ {est.image_size} px, {est.params / 1e6:,.1f}M parameters;"
                    f" {est.world} × {est.accelerator}{' (assumed: --accelerator to change)' if assumed else ''},"
                    f" ZeRO-{est.zero_stage}, micro-batch {est.micro_batch}"),
            ("memory / device", f"{est.memory_total / GIB:.3g} GiB{cap}{'' if est.fits else ' — does NOT fit'}: {parts}"),
            ("compute", f"{est.train_flops_per_image / 1e9:,.4g} GFLOPs per image (train), {est.steps:,} steps,"
                        f" {est.total_flops / 1e18:,.4g} EFLOPs")]
    if est.accelerator_days is not None:
        rows.append(("accelerator-days", f"{est.accelerator_days:,.1f} {est.accelerator}-days at MFU {est.mfu:.0%}"))
        rows.append(("wall-clock", f"{est.wall_clock_days:,.2f} days"))
    else:
        rows.append(("accelerator-days", "unknown: no peak FLOP/s for this accelerator (--accelerator)"))
    if good is not None:
        rows.append(("checkpoints", f"{est.checkpoint_bytes / 1e9:,.3g} GB each"))
        rows += good.lines(*_timing(cfg, est))
    if data is not None:
        rows.append(("data CPUs", f"{data.cpus_needed:,.0f} needed to decode the {data.images_per_s:,.0f} img/s the"
                                  f" accelerators consume, at {data.decode_per_cpu:,.0f} img/s per CPU"
                                  f" ({data.decode_source}); {data.cpus_free:,.0f} free ({data.cpus_free_how})"
                                  + (" — enough" if data.enough else " — short" + data.summary().split(" — short", 1)[1])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _timing(cfg, est) -> tuple[float | None, int, float | None]:
    """(seconds per step, the configured checkpoint_every, the run's wall-clock seconds) for the goodput lines."""
    run_s = est.wall_clock_days * 86400 if est.wall_clock_days else None
    return (run_s / est.steps if run_s and est.steps else None), cfg.storage.checkpoint_every, run_s


def run_goodput(cfg, est, rehearsal: str | None):
    """The run's goodput, with the figures the newest matching rehearsal measured (`--rehearsal`, else beside the
    runs or in benchmarks/results/) and modelled ones for the rest."""
    from vitray import goodput

    figures = {}
    if rehearsal != "none":
        found = find_rehearsal(cfg, rehearsal)
        if found is not None:
            figures = goodput.measured(*found)
    return goodput.for_run(est.checkpoint_bytes, est.nodes, figures, elastic=bool(cfg.scaling.min_workers))


def find_rehearsal(cfg, path: str | None) -> tuple[dict, str] | None:
    """(row, where) of the newest rehearsal of the configured model and resolution; `path` names the file (an error
    when it holds none), else the runs folder's rehearsals.jsonl and the source tree's are searched."""
    from vitray.config import ConfigError
    from vitray.goodput import matching

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [path] if path else [os.path.join(os.path.abspath(cfg.storage.runs_dir), "rehearsals.jsonl"),
                                 os.path.join(here, "benchmarks", "results", "rehearsals.jsonl")]
    found = []
    for p in paths:
        if not os.path.isfile(p):
            if path:
                raise ConfigError(f"--rehearsal: {p} does not exist")
            continue
        with open(p) as f:
            text = f.read()
        rows = [json.loads(text)] if p.endswith(".json") else [json.loads(line) for line in text.splitlines() if line.strip()]
        row = matching(rows, cfg.model.name, cfg.data.image_size)
        if row is not None:
            shown = os.path.relpath(p)
            found.append((row, p if shown.startswith("..") else shown))
    if path and not found:
        raise ConfigError(f"--rehearsal: {path} holds no rehearsal of {cfg.model.name} @ {cfg.data.image_size} px")
    return max(found, key=lambda f: f[0].get("time", "")) if found else None


def decode_rate(cfg, given: float | None) -> tuple[float, str]:
    """Images/s per CPU of the training decode: given, measured on the configured shards, or the reference."""
    from vitray import cost
    from vitray.data import decode_rate as rate
    from vitray.storage import Endpoint

    if given:
        return given, "given"
    if not cfg.data.train_uri:
        return cost.REFERENCE_DECODE_PER_CPU, "assumed: ImageNet-sized JPEGs; set data.train_uri to measure yours"
    endpoint = Endpoint(url=cfg.storage.endpoint_url or None, region=cfg.storage.region)
    measured = rate.measure(cfg.data.train_uri, endpoint, cfg.data.image_size, area_min=cfg.data.crop_area_min)
    return measured.per_cpu, f"measured on {measured.source}"


if __name__ == "__main__":
    sys.exit(main())
