"""``python -m ldct_tf.evaluate --tune``: tune the classical baselines' strength on paired slices (development
patients only).

    python -m ldct_tf.evaluate --pairs pairs.csv --patients L096,L143 --tune gaussian,tv --out tuning
    python -m ldct_tf.evaluate --pairs pairs.csv --patients L096,L143 --tune bm3d --tune-stride 4 --out tuning

Why a module of its own: tuning is a different question from evaluating (which strength is best, asked on
development patients, never on the test patient L286), and ``ldct_tf.baselines`` stays the denoisers themselves.
Writes ``OUT/tuning.json`` (per baseline: the grid's mean PSNR/SSIM and the best value, :func:`ldct_tf.baselines.tune`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ldct_tf import baselines
from ldct_tf.evaluate.pairs import Pair


def tune_baselines(pairs: Sequence[Pair], names: str | Sequence[str], out_dir: str | Path,
                   stride: int = 1) -> dict:
    """Tune each named baseline on every ``stride``-th pair; writes ``out_dir/tuning.json`` and returns its content."""
    if isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    chosen = pairs[::max(1, stride)]
    results = {}
    for name in names:
        results[name] = baselines.tune(name, [(p.low, p.normal) for p in chosen], progress=True)
        best = results[name]
        print(f"{name}: best {best['parameter']}={best['best']:g} on {best['slices']} slices"
              + (" (at the grid's edge: widen it)" if best["at_grid_edge"] else ""))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "tuning.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
