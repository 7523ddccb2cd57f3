"""The evaluation's PNG figures: per-slice panels, metric bars, NPS curves (``ldct_tf.evaluate`` calls
:func:`write_figures`).

What a reader of a figure must be able to tell without the code: which slice it is (its name, as in metrics.csv),
which denoiser each column is (full names, wrapped rather than cut), what the colours of a difference map mean (a
colour bar in HU), and for each metric bar whether higher or lower is better (axes start at zero, so bar lengths
compare honestly).  A re-run into the same folder must not leave the previous run's panels beside the new ones, so
the files written are listed in :data:`RECORD` and only those are removed before the next run writes its own.
"""

from __future__ import annotations

import sys

import json
import textwrap
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ldct_tf import ct, metrics

RECORD = ".written_by_ldct_tf_evaluate.json"
DIFFERENCE_HU = 100.0
#: Metric bars: metric -> axis label.  Which direction is better comes from ``ldct_tf.evaluate.METRICS``.
BAR_METRICS = {"psnr_abdomen": "PSNR, abdomen window (dB)", "ssim_abdomen": "SSIM, abdomen window",
               "psnr_wide": "PSNR, wide window (dB)", "ssim_wide": "SSIM, wide window", "rmse_hu": "RMSE (HU)",
               "noise_sd_hu": "noise SD in flat tissue (HU)"}


def pyplot():
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # a notebook's inline backend is kept
            matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("PNG figures need matplotlib (pip install matplotlib==3.10.8), or pass --no-figures") from err
    return plt


def _wrap(text: str, width: int = 24) -> str:
    """Long names (``model:saved_models/ldct_denoiser``) wrapped onto several lines, never shortened."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=True)) or text


def crop_box(shape: tuple[int, int], rois) -> metrics.Box:
    """A quarter-size crop around the first soft-tissue ROI (liver, usually), else the image centre."""
    h, w = shape[0] // 4, shape[1] // 4
    if rois.soft:
        cy, cx = rois.soft[0].top + rois.soft[0].height // 2, rois.soft[0].left + rois.soft[0].width // 2
    else:
        cy, cx = shape[0] // 2, shape[1] // 2
    top = int(np.clip(cy - h // 2, 0, shape[0] - h))
    left = int(np.clip(cx - w // 2, 0, shape[1] - w))
    return metrics.Box(top, left, h, w)


def panel_figure(label: str, pair, outputs: Mapping[str, np.ndarray], rois):
    """One slice: every denoiser's output and the reference (in the pair's display window, the liver window unless it
    says otherwise), a zoomed crop, the difference map."""
    plt = pyplot()
    liver = ct.window(getattr(pair, "window", "liver"))
    images = list(outputs.items()) + [("normal dose (reference)", pair.normal)]
    box = crop_box(pair.normal.shape, rois)
    fig, axes = plt.subplots(3, len(images), figsize=(2.6 * len(images) + 1.0, 8.6), squeeze=False,
                             layout="constrained")
    difference = None
    for col, (title, img) in enumerate(images):
        axes[0, col].imshow(img, cmap="gray", vmin=liver.low, vmax=liver.high)
        axes[0, col].add_patch(plt.Rectangle((box.left, box.top), box.width, box.height, fill=False,
                                             edgecolor="yellow", linewidth=0.8))
        axes[0, col].set_title(_wrap(title), fontsize=8)
        axes[1, col].imshow(box.crop(img), cmap="gray", vmin=liver.low, vmax=liver.high)
        difference = axes[2, col].imshow(img - pair.normal, cmap="RdBu_r", vmin=-DIFFERENCE_HU, vmax=DIFFERENCE_HU)
        for r in range(3):
            axes[r, col].set_xticks([])
            axes[r, col].set_yticks([])
    axes[0, 0].set_ylabel(f"{liver.name} window W{liver.high - liver.low:.0f}/L{(liver.high + liver.low) / 2:.0f}",
                          fontsize=8)
    axes[1, 0].set_ylabel("zoom (yellow box)", fontsize=8)
    axes[2, 0].set_ylabel("minus reference", fontsize=8)
    bar = fig.colorbar(difference, ax=list(axes[2, :]), shrink=0.9, pad=0.01)
    bar.set_label("output - reference (HU)", fontsize=8)
    fig.suptitle(f"slice {label}", fontsize=10)
    return fig


def metric_bars_figure(summary: dict, directions: Mapping[str, Optional[bool]]):
    """Mean and 95 % interval per denoiser for :data:`BAR_METRICS`; horizontal bars from zero, full names."""
    plt = pyplot()
    names = summary["denoisers"]
    fig, axes = plt.subplots(2, 3, figsize=(14.0, 1.8 + 1.1 * len(names)), layout="constrained")
    for ax, (m, label) in zip(axes.ravel(), BAR_METRICS.items()):
        stats = [summary["metrics"][n][m] for n in names]
        means = [s["mean"] if s["mean"] is not None else np.nan for s in stats]
        err = [[(s["mean"] - s["ci95"][0]) if s["mean"] is not None else 0 for s in stats],
               [(s["ci95"][1] - s["mean"]) if s["mean"] is not None else 0 for s in stats]]
        ax.barh(range(len(names)), means, xerr=err, capsize=3, color="tab:blue")
        ax.set_yticks(range(len(names)), [_wrap(n, 36) for n in names], fontsize=8)
        ax.invert_yaxis()  # first denoiser on top
        ax.set_xlim(left=0)
        better = {True: "higher is better", False: "lower is better"}.get(
            directions.get(m), "lower = less noise, but over-smoothing lowers it too")
        ax.set_title(f"{label}\n" + _wrap(f"({better})", 30), fontsize=9)
    fig.suptitle(f"mean and 95 % interval over {summary['slices']} slice(s)", fontsize=10)
    return fig


def nps_figure(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], reference_key: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2), layout="constrained")
    for n, series in curves.items():
        series = [(f, v) for f, v in series if len(f)]
        if not series:
            continue
        f_min, f_max = max(f.min() for f, _ in series), min(f.max() for f, _ in series)
        grid = np.linspace(f_min, f_max, 48)  # only where every slice has data (pixel spacings differ)
        mean_curve = np.mean([np.interp(grid, f, v) for f, v in series], axis=0)
        ax.plot(grid, mean_curve, label=n if n != reference_key else "normal dose (reference)",
                linestyle="--" if n == reference_key else "-")
    ax.set_xlabel("spatial frequency (cycles/mm)")
    ax.set_ylabel("NPS (HU$^2$ mm$^2$)")
    ax.set_yscale("log")
    ax.set_title("Noise power spectrum in flat soft-tissue ROIs (mean over slices)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def remove_previous(folder: Path) -> list[str]:
    """Delete the figures an earlier run of this tool wrote into ``folder`` (as listed in its record), nothing else."""
    record = folder / RECORD
    try:
        names = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    removed = []
    for name in names:
        path = folder / Path(str(name)).name  # names only: a record can never point outside the folder
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    record.unlink()
    return removed


def write_figures(summary: dict, panels, curves, folder: Path, directions: Mapping[str, Optional[bool]],
                  reference_key: str) -> list[Path]:
    """``panels``: [(slice name, Pair, {denoiser: output}, rois)].  Returns the PNG paths written."""
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    remove_previous(folder)
    figures = [(f"panel_{i + 1:02d}.png", panel_figure(*panel)) for i, panel in enumerate(panels)]
    figures += [("metric_bars.png", metric_bars_figure(summary, directions)),
                ("nps.png", nps_figure(curves, reference_key))]
    # the record first: a run that dies half-way still lets the next one remove what it wrote
    (folder / RECORD).write_text(json.dumps({"tool": "ldct_tf.evaluate", "files": [n for n, _ in figures]}) + "\n")
    written = []
    for name, fig in figures:
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)
    return written
