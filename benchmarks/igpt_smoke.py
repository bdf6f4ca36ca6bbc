"""iGPT's two objectives side by side on the digits: `jobs/pretrain_igpt.py --preset smoke` (next pixel) and
`--preset smoke_bert` (masked pixels), one after the other in one run. Records each held-out NLL, the linear probe
accuracy of every layer and the wall-clock time, with the machine and versions.

    python benchmarks/igpt_smoke.py
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, write_result


def main() -> None:
    runs = {}
    with tempfile.TemporaryDirectory(prefix="vitray-igpt-") as root:
        for preset in ("smoke", "smoke_bert"):
            t = time.time()
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "pretrain_igpt.py"), "--preset", preset,
                                   "--set", f"storage.uri={root}"], capture_output=True, text=True, check=True, cwd=ROOT)
            summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"run"')))
            runs[preset] = {"val_nll": summary["val_nll"], "val_bits_per_pixel": summary["val_bits_per_pixel"],
                            "probe_by_layer": summary["linear_probe"], "best_layer": summary["best_layer"],
                            "steps": summary["step"], "wall_s": time.time() - t}
    write_result("igpt_smoke", {
        "what": "jobs/pretrain_igpt.py: igpt_smoke (4 layers, width 64) on 8×8 digits with a 16-colour palette, 2 CPU "
                "workers, ZeRO-2; next-pixel (smoke) vs BERT masked-pixel (smoke_bert) objectives; NLL of the "
                "predicted tokens (all pixels vs the 15 % masked), logistic-regression probes on each layer's "
                "mean-pooled features (train split → 297 held-out digits)",
        "uniform_nll": math.log(16), "runs": runs,
    })


if __name__ == "__main__":
    main()
