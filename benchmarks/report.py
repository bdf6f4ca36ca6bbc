"""Print the benchmark results in benchmarks/results/ as the Markdown table the README shows.

    python benchmarks/report.py
"""
from __future__ import annotations

import json
import statistics
import os

from common import ROOT


def load(name: str) -> dict | None:
    path = os.path.join(ROOT, "benchmarks", "results", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def _whole(r: dict) -> str:
    """Ingest rates are after each pass's first batch; the ratio of whole passes, start-up included, beside them."""
    whole = r.get("ratio_whole_pass_per_round")
    if not whole:
        return ""
    return f" (whole passes: {statistics.median(whole):.2f}×; first batch {min(r['first_batch_s']):.1f}–{max(r['first_batch_s']):.1f} s)"


def main() -> None:
    rows = []
    i = load("ingest")
    for kind, label, goal in (("imagenet", "ImageNet-sized", 1.5), ("large", "1,600–2,560 px", 4.0),
                              ("large-512", "1,600–2,560 px (vitray's stored at `--max-side 512`)", 4.0)):
        r = (i or {}).get(kind)
        if r:
            rows.append(
                f"| ingest, {r['images']} {label} real-photo JPEGs at {i['image_size']} px, {i['cpu_workers']} CPU workers "
                f"| {min(r['ray_data_images_per_s']):.0f}–{max(r['ray_data_images_per_s']):.0f} img/s (Ray Data, {i.get('shards_on', 'S3')}; "
                f"decode alone {r['decode_full_per_core']:.0f}/core full size, {r['decode_at_crop_scale_per_core']:.0f} at the crop's scale"
                + (f", {r['decode_region_per_core']:.0f} its region only" if r.get("decode_region_per_core") else "") + ") "
                f"| {min(r['dataloader_images_per_s']):.0f}–{max(r['dataloader_images_per_s']):.0f} img/s (DataLoader, local files) "
                f"| **{r['ratio_median']:.2f}×**{_whole(r)} | ≥ {goal}× — {verdict(r['ratio_median'] >= goal)} |")
    if i and "imagenet" not in i:  # a result written before the photo sets
        rows.append(
            f"| ingest, {i['images']} real-photo JPEGs at {i['image_size']} px, {i['cpu_workers']} CPU workers "
            f"| {min(i['ray_data_images_per_s']):.0f}–{max(i['ray_data_images_per_s']):.0f} img/s (Ray Data, {i.get('shards_on', 'S3')}) "
            f"| {min(i['dataloader_images_per_s']):.0f}–{max(i['dataloader_images_per_s']):.0f} img/s (DataLoader, local files) "
            f"| **{i['ratio_median']:.2f}×** | ≥ 1.0× — {verdict(i['ratio_median'] >= 1.0)} |")
    w = load("write_shards")
    if w:
        in21k_min = w["in21k_64_cores_modelled"]["minutes"]
        cores = statistics.median(a / b for a, b in zip(w["ray_writer_img_s"], w["ray_writer_img_per_cpu_s"]))
        rows.append(
            f"| shard writing, {w['photos'].split(' (')[0]}, {w['workers']} CPUs (shared) "
            f"| {min(w['ray_writer_img_s']):.0f}–{max(w['ray_writer_img_s']):.0f} img/s (Ray writer; it got {cores:.1f}"
            f" of {w['workers']} cores; {w['ray_writer_per_core_img_s']:.0f} img per CPU-second, "
            f"{w['ray_writer_cpu_efficiency']:.2f}× the single process's; ImageNet-21k on 64 cores modelled:"
            f" {in21k_min:.0f} min) "
            f"| {min(w['single_process_img_s']):.0f}–{max(w['single_process_img_s']):.0f} img/s (single process;"
            f" {statistics.median(w['single_process_img_per_cpu_s']):.0f} per CPU-second; ImageNet-21k:"
            f" {w['in21k_64_cores_modelled']['single_process_hours']:.1f} h) "
            f"| **{w['ratio_median']:.2f}×** | — (ideal {w['workers']:.1f}× on free cores) |")
    for stage in (1, 0):
        e = load(f"engine_overhead_zero{stage}")
        if e:
            rows.append(
                f"| engine step, `{e['model']}` @ {e['image_size']} px, 2 CPU workers, ZeRO-{stage} "
                f"| {1000 * min(e['ray_deepspeed_step_s']):.1f}–{1000 * max(e['ray_deepspeed_step_s']):.1f} ms (Ray Train + DeepSpeed) "
                f"| {1000 * min(e['ddp_step_s']):.1f}–{1000 * max(e['ddp_step_s']):.1f} ms (DDP, gloo) "
                f"| **{e['ratio_median']:.2f}×** | ≤ 1.10× — {verdict(e['ratio_median'] <= 1.10)} |")
    s = load("submit_latency")
    if s:
        rows.append(
            f"| `ray job submit` → first optimizer step, smoke preset | warm {min(s['warm_s']):.1f}–{max(s['warm_s']):.1f} s, "
            f"cold {s['cold_s']:.1f} s | — | — | warm ≤ 20 s — {verdict(min(s['warm_s']) <= 20)} (best warm run) |")
    c = load("smoke_chain")
    if c:
        rows.append(
            f"| transfer smoke chain: `vit_smoke` digits, pretrain 16 px → fine-tune 24 px | held-out top-1 "
            f"{c['pretrain_val_top1']:.3f} → {c['finetune_val_top1_ema']:.3f} (EMA; raw {c['finetune_val_top1_raw']:.3f}), "
            f"{c['wall_s']:.0f} s | — | — | ≥ 0.97 — {verdict(c['finetune_val_top1_ema'] >= 0.97)} |")
    d = load("detr_smoke")
    if d:
        f = d["final"]
        rows.append(
            f"| DETR smoke: `detr_smoke` on 64 px digit canvases, 2 CPU workers, {d['steps']} steps | held-out AP50 "
            f"{f['val_AP50']:.3f}, AP {f['val_AP']:.3f}, {d['wall_s']:.0f} s with backbone pretraining | — | — | "
            f"AP50 ≥ 0.3 — {verdict(f['val_AP50'] >= 0.3)} |")
    g = load("igpt_smoke")
    for preset, r in (g or {}).get("runs", {}).items():
        probes = " / ".join(f"{v:.2f}" for _, v in sorted(r["probe_by_layer"].items(), key=lambda kv: int(kv[0])))
        rows.append(
            f"| iGPT `{preset}`: 8×8 digits, 16 colours, {r['steps']} steps | held-out NLL {r['val_nll']:.2f} nats "
            f"(uniform {g['uniform_nll']:.2f}); probes by layer {probes}; {r['wall_s']:.0f} s | — | — | NLL < 0.7 × "
            f"uniform — {verdict(r['val_nll'] < 0.7 * g['uniform_nll'])} |")
    t = load("peer_timm")
    for r in (t or {}).get("rows", []):
        q1, q3 = r["ratio_quartiles"]
        rows.append(
            f"| train step `{r['vitray']}` vs timm `{r['timm']}` ({t['what'].split(', ', 1)[1]}), {r['steps']} "
            f"alternating steps each | {r['vitray_images_per_s']:.2f} img/s (median step) | "
            f"{r['timm_images_per_s']:.2f} img/s (timm {t['timm']}) | **{r['ratio_median']:.2f}×** (quartiles "
            f"{q1:.2f}–{q3:.2f}) | ≥ 1.0× — {verdict(r['ratio_median'] >= 1.0)} |")
    m = (i or s or {}).get("machine", {})
    print(f"Measured on {m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB, GPU: {m.get('gpu')}; "
          f"Python {m.get('python')}, Ray {m.get('ray')}, torch {m.get('torch')}, DeepSpeed {m.get('deepspeed')}.\n")
    print("| benchmark | vitray | baseline | ratio (median of interleaved rounds) | goal |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
