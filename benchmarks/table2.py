"""The paper's Table 2 compute (TPUv3-core-days) and Table 6 exaFLOPs beside vitray's analytic counts, the
utilisation they imply, and vitray's measured rows (benchmarks/results/accelerator_days.jsonl) projected to the
paper's schedules.

    python benchmarks/table2.py
"""
from __future__ import annotations

import json
import os

from common import ROOT

from vitray import paper_cost


def main() -> None:
    from vitray.config.recipes import DATASETS

    print("| model | data | paper TPUv3-core-days | epochs | vitray EFLOPs | implied utilisation |")
    print("|---|---|---|---|---|---|")
    for (model, dataset), (days, epochs_options) in paper_cost.TABLE2_CORE_DAYS.items():
        for epochs in epochs_options:
            ef = paper_cost.paper_exaflops(model, epochs, DATASETS[dataset]["num_images"],
                                     num_classes=DATASETS[dataset]["num_classes"])
            print(f"| {model} | {dataset} | {days:,} | {epochs} | {ef:,.0f} | {paper_cost.utilisation(ef, days):.0%} |")
    print()
    print("| model | EFLOPs (Table 6) | vitray, counted as the paper (XLA) | ratio | as vitray computes it | ratio |")
    print("|---|---|---|---|---|---|")
    for (model, epochs), ef in paper_cost.TABLE6_EXAFLOPS.items():
        mine, dense = paper_cost.paper_exaflops(model, epochs), paper_cost.paper_exaflops(model, epochs, paper=False)
        print(f"| {model} {epochs} ep | {ef:,} | {mine:,.1f} | {mine / ef:.3f} | {dense:,.1f} | {dense / ef:.3f} |")
    log = os.path.join(ROOT, "benchmarks", "results", "accelerator_days.jsonl")
    if not os.path.exists(log):
        return
    with open(log) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print("\nvitray measured (projection = paper schedule ÷ measured images/s per accelerator):\n")
    print("| model | px | batch | ZeRO | workers × accel | img/s/accel | MFU | mem/device GiB | JFT 7 / 14 ep | "
          "I21k 30 / 90 ep | ImageNet 300 ep (accel-days) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pj = r["projected_accelerator_days"]
        print(f"| {r['model']} | {r['image_size']} | {r['global_batch']} | {r['zero_stage']} | {r['workers']} × "
              f"{r['accelerator']} | {r['images_per_s_per_accelerator']:.1f} | {r['mfu']:.1%} | "
              f"{r['memory_per_device_gib']:.2f} | {pj['jft_7ep']:,.0f} / {pj['jft_14ep']:,.0f} | "
              f"{pj['i21k_30ep']:,.0f} / {pj['i21k_90ep']:,.0f} | {pj['imagenet_300ep']:,.0f} |")


if __name__ == "__main__":
    main()
