"""Blinded reader studies: write a randomised kit of cases, then unblind the filled score sheets and summarise them.

Why a module of its own: PSNR and SSIM do not say whether radiologists would accept an image; a reader study does,
and its kit, key and agreement statistics (quadratically weighted Cohen's kappa) are a separate job from scoring.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ldct_tf import ct
from ldct_tf.evaluate.denoisers import SliceDenoiser
from ldct_tf.evaluate.pairs import EvaluateInputError, Pair
from ldct_tf.evaluate.report import fmt
from ldct_tf.evaluate.scoring import REFERENCE, interval95
from ldct_tf.jsonio import jsonable

READER_CRITERIA = ("noise", "sharpness", "artifacts", "diagnostic_confidence")


def write_reader_study(pairs: Sequence[Pair], denoisers: Mapping[str, SliceDenoiser], n_slices: int,
                       out_dir: str | Path, seed: int = 0) -> dict:
    """Blinded, randomised reader-study kit: ``n_slices`` slices x (every denoiser + the normal-dose reference).

    Writes ``cases/case_XXXX.png`` (liver window, no labels, random ids in random order), ``score_sheet.csv``
    (one row per case; readers fill ``reader`` and 1-5 scores: noise, sharpness, artifacts, diagnostic_confidence,
    5 = best) and ``key.csv`` (case -> slice and denoiser; keep it from the readers).  Returns the paths.
    """
    from ldct_tf.evaluate.figures import pyplot

    plt = pyplot()
    if n_slices < 1:
        raise EvaluateInputError(f"--reader-study needs at least 1 slice, got {n_slices}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pairs), size=min(n_slices, len(pairs)), replace=False)
    cases = []
    for i in sorted(chosen):
        pair = pairs[int(i)]
        for name, fn in denoisers.items():
            cases.append((pair.name, name, np.asarray(fn(pair.low), np.float32)))
        cases.append((pair.name, REFERENCE, pair.normal))
    order = rng.permutation(len(cases))
    ids = rng.choice(np.arange(1000, 10000), size=len(cases), replace=False)
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    liver = ct.window("liver")
    key_rows, sheet_rows = [], []
    for pos, k in enumerate(order):
        slice_name, denoiser, image = cases[k]
        case = f"case_{ids[pos]:04d}"
        plt.imsave(out / "cases" / f"{case}.png", liver.to_unit(image), cmap="gray", vmin=0.0, vmax=1.0)
        key_rows.append({"case": case, "slice": slice_name, "denoiser": denoiser})
        sheet_rows.append({"case": case, "image": f"cases/{case}.png", "reader": "",
                           **{c: "" for c in READER_CRITERIA}, "comment": ""})
    with open(out / "key.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "slice", "denoiser"])
        w.writeheader()
        w.writerows(key_rows)
    with open(out / "score_sheet.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "image", "reader", *READER_CRITERIA, "comment"])
        w.writeheader()
        w.writerows(sheet_rows)
    (out / "READ_ME_FIRST.txt").write_text(
        "Reader study. Give readers the cases/ folder and a copy of score_sheet.csv each; keep key.csv away.\n"
        "Score every case 1-5 on each criterion (5 = best: least noise, sharpest, fewest artifacts, most confident),\n"
        "put your reader name or initials in the 'reader' column, return the sheet. Then run\n"
        "  python -m ldct_tf.evaluate --score-sheet sheet_reader1.csv --score-sheet sheet_reader2.csv --out DIR\n"
        "(add --key key.csv when the sheets are not beside key.csv).\n")
    return {"cases": len(cases), "key": str(out / "key.csv"), "score_sheet": str(out / "score_sheet.csv")}


def weighted_kappa(a: Sequence[int], b: Sequence[int], categories: Sequence[int] = (1, 2, 3, 4, 5)) -> float:
    """Cohen's quadratically weighted kappa of two readers' ordinal scores (1.0 = perfect, 0 = chance)."""
    idx = {c: i for i, c in enumerate(categories)}
    k = len(categories)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[idx[x], idx[y]] += 1
    n = observed.sum()
    if n == 0:
        return float("nan")
    expected = np.outer(observed.sum(1), observed.sum(0)) / n
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    denom = (weights * expected).sum()
    return float(1.0 - (weights * observed).sum() / denom) if denom > 0 else float("nan")


def summarise_scores(sheets: Sequence[str | Path], key_path: Optional[str | Path] = None) -> dict:
    """Unblind filled score sheets with the key; mean score per denoiser and criterion, inter-reader agreement.

    Agreement per criterion: mean pairwise quadratically weighted Cohen's kappa over reader pairs and the share of
    cases where two readers gave the same score.  Needs two or more readers for agreement (else ``None``).
    """
    sheets = [Path(s) for s in sheets]
    if key_path:
        key_path = Path(key_path)
        if not key_path.is_file():
            raise FileNotFoundError(f"{key_path}: the reader-study key given with --key was not found (the kit "
                                    f"writes it as OUT/reader_study/key.csv)")
    else:
        key_path = sheets[0].parent / "key.csv"
        if not key_path.is_file():
            raise FileNotFoundError(f"{key_path}: no reader-study key beside the first score sheet; pass --key "
                                    f"OUT/reader_study/key.csv")
    with open(key_path, newline="") as f:
        key = {r["case"]: r for r in csv.DictReader(f)}
    scores: dict[str, dict[str, dict[str, int]]] = {}  # reader -> case -> criterion -> score
    for sheet in sheets:
        with open(sheet, newline="") as f:
            for line, r in enumerate(csv.DictReader(f), start=2):
                if r.get("case") not in key:
                    raise EvaluateInputError(f"{sheet}:{line}: case {r.get('case')!r} is not in {key_path}")
                reader = (r.get("reader") or "").strip() or sheet.stem
                for c in READER_CRITERIA:
                    value = (r.get(c) or "").strip()
                    if not value:
                        continue
                    if value not in {"1", "2", "3", "4", "5"}:
                        raise EvaluateInputError(f"{sheet}:{line}: {c} must be an integer 1-5, got {value!r}")
                    scores.setdefault(reader, {}).setdefault(r["case"], {})[c] = int(value)
    if not scores:
        raise EvaluateInputError(f"no scores found in {[str(s) for s in sheets]}")
    readers = sorted(scores)
    denoisers = sorted({r["denoiser"] for r in key.values()})
    per_denoiser = {d: {c: interval95([scores[rd][case][c] for rd in readers for case in scores[rd]
                                       if key[case]["denoiser"] == d and c in scores[rd][case]])
                        for c in READER_CRITERIA} for d in denoisers}
    agreement = {}
    for c in READER_CRITERIA:
        kappas, exact, n_pairs = [], [], 0
        for i, ra in enumerate(readers):
            for rb in readers[i + 1:]:
                common = [k for k in scores[ra] if k in scores[rb] and c in scores[ra][k] and c in scores[rb][k]]
                if not common:
                    continue
                a = [scores[ra][k][c] for k in common]
                b = [scores[rb][k][c] for k in common]
                kappas.append(weighted_kappa(a, b))
                exact.append(float(np.mean(np.equal(a, b))))
                n_pairs += 1
        agreement[c] = {"reader_pairs": n_pairs,
                        "weighted_kappa": float(np.nanmean(kappas)) if kappas else None,
                        "exact_agreement": float(np.mean(exact)) if exact else None}
    return {"readers": len(readers), "cases_scored": len({k for r in scores.values() for k in r}),
            "scores": per_denoiser, "agreement": agreement}


def score_report_markdown(result: dict) -> str:
    """reader_scores.md: mean score per denoiser and criterion, then inter-reader agreement."""
    lines = [f"# Reader study: {result['readers']} reader(s), {result['cases_scored']} cases", "",
             "Mean score (1-5, 5 = best) and 95 % interval per denoiser; `reference` is the normal-dose slice.", "",
             "| denoiser | " + " | ".join(READER_CRITERIA) + " |", "|---" * (len(READER_CRITERIA) + 1) + "|"]
    for d, crit in result["scores"].items():
        lines.append(f"| {d} | " + " | ".join(fmt(crit[c], 2) for c in READER_CRITERIA) + " |")
    lines += ["", "Inter-reader agreement (mean pairwise quadratically weighted Cohen's kappa; exact agreement):", ""]
    for c, a in result["agreement"].items():
        if a["weighted_kappa"] is None:
            lines.append(f"- {c}: n/a (needs two readers scoring the same cases)")
        else:
            lines.append(f"- {c}: kappa {a['weighted_kappa']:.2f}, exact {a['exact_agreement']:.0%} "
                         f"({a['reader_pairs']} reader pair(s))")
    return "\n".join(lines) + "\n"


def write_score_summary(sheets: Sequence[str | Path], key_path: Optional[str | Path] = None,
                        out_dir: Optional[str | Path] = None) -> tuple[dict, str]:
    """Unblind and summarise filled score sheets into ``out_dir`` (default: the first sheet's folder):
    ``reader_scores.json`` (strict JSON) and ``reader_scores.md``; returns the summary and the Markdown."""
    result = summarise_scores(sheets, key_path)
    out = Path(out_dir or Path(sheets[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reader_scores.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
    text = score_report_markdown(result)
    (out / "reader_scores.md").write_text(text)
    return result, text
