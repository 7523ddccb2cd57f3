"""The steps of ``python -m experiments.v3`` (see there)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import Optional

import numpy as np

from experiments import v3_data

#: Training budget per seed (steps of a batch of BATCH patches of PATCH x PATCH).
STEPS = 2500
BATCH = 16
PATCH = 96
LEARNING_RATE = 1e-3
#: The second recipe continues each seed on the normal-dose target for this many steps at this learning rate.
FINETUNE_STEPS = 500
FINETUNE_LEARNING_RATE = 3e-4
MODEL = dict(depth=3, base_filters=16, residual_blocks=2, attention=True, norm="none", noise_conditional=True)


def _simulate_one(item):
    key, hu, spacing, realisations, i0, out = item
    target = Path(out) / f"{key}.npz"
    if target.exists():
        return key, 0.0
    start = time.process_time()
    pairs = v3_data.simulate_source(key, hu, spacing, realisations, i0)
    np.savez(target.with_suffix(".tmp.npz"), **pairs)
    target.with_suffix(".tmp.npz").rename(target)
    return key, time.process_time() - start


def simulate(work: Path, realisations: int, processes: int) -> None:
    """Simulated pairs of every training source slice, one file per slice (a re-run skips what exists)."""
    out = work / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    i0 = v3_data.calibrated_i0()
    items = [(k, hu, s, realisations, i0, str(out)) for k, hu, s in v3_data.source_slices(v3_data.data_root())]
    print(f"simulate: {len(items)} source slices x {realisations} realisations, {processes} processes", flush=True)
    cpu = 0.0
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for n, (key, seconds) in enumerate(pool.imap_unordered(_simulate_one, items), 1):
            cpu += seconds
            print(f"simulate: {n}/{len(items)} slices", flush=True)
    (work / "simulate.json").write_text(json.dumps({"source_slices": len(items), "realisations": realisations,
                                                    "i0": i0, "dose_range": v3_data.DOSE_RANGE,
                                                    "filters": v3_data.FILTERS, "cpu_seconds": cpu}, indent=1))


#: Range of the factor that scales a patch's inserted noise when ``noise_rescale`` > 0.  Scaling the extra noise of a
#: dose-``k`` realisation by ``s`` gives the extra noise of dose ``1 / (1 + s**2 (1/k - 1))``: 0.1 on a 50 % pair is a
#: 99 % dose, so the network also sees inputs with almost nothing to remove (where v3 overshoots: at L143's simulated
#: 50 % dose, v3's D45f output scores below its input, experiments/results/v3_validation.json).
RESCALE_RANGE = (0.1, 1.0)


def _patch_stream(lows: list, refs: list, seed: int, noise_rescale: float = 0.0):
    """Endless (low, reference) patches on the model scale: random pair, position, flip and quarter turn; patches
    mostly of air are drawn again; with probability ``noise_rescale`` the patch's inserted noise is scaled by a
    factor drawn from :data:`RESCALE_RANGE` (a higher dose).  Deterministic for a seed."""
    from ldct_tf import ct

    rng = np.random.default_rng(seed)
    while True:
        i = int(rng.integers(len(lows)))
        low, ref = lows[i], refs[i]
        n = low.shape[0]
        y, x = (int(v) for v in rng.integers(0, n - PATCH + 1, size=2))
        ref_patch = ref[y:y + PATCH, x:x + PATCH]
        if float(ref_patch.mean()) < -800.0:
            continue
        low_patch = low[y:y + PATCH, x:x + PATCH]
        if noise_rescale and rng.random() < noise_rescale:
            low_patch = ref_patch + float(rng.uniform(*RESCALE_RANGE)) * (low_patch - ref_patch)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        pair = [np.rot90(p, k) for p in (low_patch, ref_patch)]
        if flip:
            pair = [p[:, ::-1] for p in pair]
        yield tuple(ct.to_model(np.ascontiguousarray(p)[..., None]) for p in pair)


def _dataset(work: Path, seed: int, target: str = "projected", noise_rescale: float = 0.0):
    import tensorflow as tf

    lows, refs = v3_data.load_training_pairs(work, target)
    spec = tf.TensorSpec((PATCH, PATCH, 1), tf.float32)
    ds = tf.data.Dataset.from_generator(lambda: _patch_stream(lows, refs, seed, noise_rescale),
                                        output_signature=(spec, spec))
    return ds.batch(BATCH).prefetch(2), len(lows)


def build_model(coarse_noise: bool = False):
    from ldct_tf.models.generator import build_generator

    return build_generator(name="low_to_normal", **MODEL, **({"noise_coarse": True} if coarse_noise else {}))


def transplant(source, target) -> list[str]:
    """Copy ``source``'s weights into ``target`` layer by layer (matched by name).  A weight that only grew along its
    input-channel axis (the first convolution, when ``target`` sees an extra noise channel) keeps the source's
    slice and starts at zero for the new channels, so ``target`` computes what ``source`` did until trained.
    Returns the names of the layers that were widened."""
    widened = []
    by_name = {layer.name: layer for layer in source.layers if layer.weights}
    mine = {layer.name for layer in target.layers if layer.weights}
    if mine != set(by_name):  # a partial copy would train from a half-random network without saying so
        raise ValueError(f"cannot transplant: layers with weights differ ({sorted(mine ^ set(by_name))})")
    for layer in target.layers:
        if not layer.weights:
            continue
        new = []
        for old, cur in zip(by_name[layer.name].get_weights(), layer.get_weights()):
            if old.shape == cur.shape:
                new.append(old)
                continue
            if old.ndim != 4 or old.shape[:2] + old.shape[3:] != cur.shape[:2] + cur.shape[3:] \
                    or old.shape[2] > cur.shape[2]:
                raise ValueError(f"layer {layer.name}: cannot transplant a weight of shape {old.shape} into "
                                 f"{cur.shape}")
            grown = np.zeros_like(cur)
            grown[:, :, :old.shape[2], :] = old
            new.append(grown)
            widened.append(layer.name)
        layer.set_weights(new)
    return widened


def train(work: Path, seed: int, steps: int, threads: int = 0, target: str = "projected",
          init: Optional[str] = None, learning_rate: float = LEARNING_RATE, noise_rescale: float = 0.0,
          name: Optional[str] = None, coarse_noise: bool = False) -> None:
    """One seed of the v3 recipe: supervised on the simulated pairs, MSE + gradient MSE, Adam with cosine decay.

    ``threads`` > 0 pins TF to that many threads (seeds trained side by side on a small machine).  ``init``: a run
    folder name (``seed0``) whose weights this run continues from, written to ``{target}_from_{init}`` unless
    ``name`` names the run folder.  ``noise_rescale``: see :func:`_patch_stream`.  ``coarse_noise``: the network
    also sees the coarse noise level (:func:`ldct_tf.noise.coarse_noise_index_hu`); from ``init``, by
    :func:`transplant`."""
    out = work / (name or (f"{target}_from_{init}" if init else f"seed{seed}"))
    # checked before the pairs load (minutes), and nothing is written when one fails
    if (out / "generator.keras").exists():
        raise FileExistsError(f"{out}: holds a trained run already; remove it or give another --name")
    if init and not (work / init / "generator.keras").exists():
        raise FileNotFoundError(f"{work / init}: no generator.keras to continue from (--init)")
    if not any((work / "pairs").glob("*.npz")):
        raise FileNotFoundError(f"{work / 'pairs'}: no simulated pairs (run `python -m experiments.v3 simulate` first)")
    import keras
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(seed)
    ds, n_pairs = _dataset(work, seed, target, noise_rescale)
    model = build_model(coarse_noise)
    if init:
        from ldct_tf.models import blocks  # noqa: F401  (registers NoiseLevelMap for loading)

        transplant(keras.saving.load_model(work / init / "generator.keras", compile=False), model)
    log, wall, cpu = fit(model, ds, steps, learning_rate, f"train seed {seed}")
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "generator.keras")
    (out / "train.json").write_text(json.dumps({
        "seed": seed, "steps": steps, "batch": BATCH, "patch": PATCH, "learning_rate": learning_rate,
        "target": target, "init": init, "noise_rescale": noise_rescale,
        "model": {**MODEL, "noise_coarse": coarse_noise}, "parameters": int(model.count_params()), "training_pairs": n_pairs,
        "wall_seconds": wall, "cpu_seconds": cpu, "log": log},
        indent=1))


def fit(model, ds, steps: int, learning_rate: float, label: str) -> tuple[list[dict], float, float]:
    """The v3 recipe's supervised loop, shared by every experiment that trains its model: MSE + gradient MSE, Adam
    with cosine decay, ``steps`` batches of ``ds``.  Returns the loss log (every 100 steps), wall and CPU seconds."""
    import keras
    import tensorflow as tf

    from ldct_tf.models import losses

    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps))

    @tf.function
    def step(low, ref):
        with tf.GradientTape() as tape:
            out = model(low, training=True)
            loss = losses.mse_loss(out, ref) + losses.gradient_mse_loss(out, ref)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    start_wall, start_cpu, log = time.time(), time.process_time(), []
    for n, (low, ref) in enumerate(ds.take(steps), 1):
        loss = float(step(low, ref))
        if n % 100 == 0 or n == steps:
            log.append({"step": n, "loss": loss})
            print(f"{label}: step {n}/{steps} loss {loss:.5f} ({time.time() - start_wall:.0f} s)", flush=True)
    return log, time.time() - start_wall, time.process_time() - start_cpu


#: BM3D's strength is ``factor x`` the input's own noise index (``ldct_tf.noise``): noise-adaptive, tuned per dose.
BM3D_FACTORS = (1.5, 2.5, 4.0)
#: Where the grid may widen to, below and above.
BM3D_WIDER = (0.5, 0.7, 1.0, 6.0, 9.0)
#: Slices of the validation patient on which BM3D's factor is tuned (BM3D costs ~7 s a slice here).
BM3D_TUNING_SLICES = 4
RESULTS = v3_data.REPO / "experiments" / "results"


def conditions(pairs: list[dict], seed_base: int) -> dict[str, list[tuple[np.ndarray, np.ndarray, str]]]:
    """(low, reference, kernel) per condition: the real quarter dose, and 10/25/50 % sweeps of the normal dose."""
    i0 = v3_data.calibrated_i0()
    out = {"real_25": [(p["quarter"], p["full"], p["kernel"]) for p in pairs]}
    sweeps = [v3_data.sweep(p["full"], p["spacing"], v3_data.SWEEP_DOSES, seed_base + i, i0,
                            v3_data.filter_of_kernel(p["kernel"])) for i, p in enumerate(pairs)]
    for j, dose in enumerate(v3_data.SWEEP_DOSES):
        out[f"sim_{int(round(dose * 100))}"] = [(lows[j], p["full"], p["kernel"]) for lows, p in zip(sweeps, pairs)]
    return out


def _scores(outputs: list[np.ndarray], cases: list) -> dict:
    from ldct_tf import metrics

    psnr = [metrics.psnr(o, ref, "abdomen") for o, (_, ref, _) in zip(outputs, cases)]
    ssim = [metrics.ssim(o, ref, "abdomen") for o, (_, ref, _) in zip(outputs, cases)]
    return {"psnr": psnr, "ssim": ssim, "kernels": [k for _, _, k in cases]}


def keras_denoiser(path: Path):
    import keras

    from ldct_tf import ct
    from ldct_tf.models import blocks  # noqa: F401  (registers NoiseLevelMap for loading)

    model = keras.saving.load_model(path, compile=False)
    return lambda hu: ct.from_model(np.asarray(model(ct.to_model(hu)[None, ..., None], training=False))[0, ..., 0])


def bm3d_denoiser(factor: float):
    from ldct_tf import baselines, noise

    return lambda hu: baselines.bm3d(hu, sigma_hu=max(factor * noise.noise_index(hu), 1.0))


def _grid_point(name: str, subset: list, factor: float) -> dict:
    fn = bm3d_denoiser(factor)
    s = _scores([fn(low) for low, _, _ in subset], subset)
    point = {"psnr": float(np.mean(s["psnr"])), "ssim": float(np.mean(s["ssim"]))}
    print(f"validate: BM3D {name} factor {factor}: {point}", flush=True)
    return point


def _bm3d_one(item):
    low, factor = item
    return bm3d_denoiser(factor)(low)


def bm3d_scores(cases: list, factor: float, processes: int = 2) -> dict:
    """BM3D at ``factor`` on every case, slices spread over processes (BM3D is single-threaded)."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        outputs = pool.map(_bm3d_one, [(low, factor) for low, _, _ in cases])
    s = _scores(outputs, cases)
    return {**s, **_summary(s), "factor": factor}


def tune_bm3d(conds: dict, known: Optional[dict] = None) -> dict:
    """Per condition, BM3D's noise factor at its best mean abdomen PSNR and at its best mean SSIM (tuning slices).

    Starts from :data:`BM3D_FACTORS` and widens the grid (:data:`BM3D_WIDER`) while either optimum sits at its edge,
    so each reported optimum is an interior one (or the widest tried).  ``known``: grid points already scored."""
    chosen = {}
    for name, cases in conds.items():
        subset = cases[:BM3D_TUNING_SLICES // 2] + cases[-(BM3D_TUNING_SLICES // 2):]
        grid = {float(k): v for k, v in ((known or {}).get(name, {}).get("grid", {})).items()}
        factors = sorted(set(BM3D_FACTORS) | set(grid))
        while True:
            for factor in factors:
                if factor not in grid:
                    grid[factor] = _grid_point(name, subset, factor)
            best = {m: max(grid, key=lambda f, m=m: grid[f][m]) for m in ("psnr", "ssim")}
            below = [f for f in BM3D_WIDER if f < min(grid)] if min(grid) in best.values() else []
            above = [f for f in BM3D_WIDER if f > max(grid)] if max(grid) in best.values() else []
            if not below and not above:
                break
            factors = sorted(set(factors) | ({max(below)} if below else set()) | ({min(above)} if above else set()))
        chosen[name] = {"grid": {str(k): grid[k] for k in sorted(grid)}, "psnr_optimal": best["psnr"],
                        "ssim_optimal": best["ssim"]}
    return chosen


def bm3d_tuning(work: Path, conds: Optional[dict] = None) -> dict:
    """BM3D's factors per condition on the validation patient (``work/bm3d_tuning.json``); it needs no model, so it
    can run beside training.  Grid points already in that file are not scored again."""
    cached = work / "bm3d_tuning.json"
    known = json.loads(cached.read_text()) if cached.exists() else {}
    if conds is None:
        conds = conditions(v3_data.mayo_pairs(v3_data.data_root(), v3_data.VALIDATION_PATIENT), seed_base=1000)
    known = tune_bm3d(conds, known)
    work.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(known, indent=1))
    return {k: {**v, "psnr_optimal": float(v["psnr_optimal"]), "ssim_optimal": float(v["ssim_optimal"])}
            for k, v in known.items()}


def _summary(scores: dict) -> dict:
    return {"psnr_mean": float(np.mean(scores["psnr"])), "ssim_mean": float(np.mean(scores["ssim"]))}


def evaluate_all(conds: dict, denoisers: dict) -> dict:
    out = {}
    for name, cases in conds.items():
        out[name] = {}
        for label, fn in denoisers.items():
            s = _scores([fn(low) for low, _, _ in cases], cases)
            out[name][label] = {**s, **_summary(s)}
            print(f"{name} {label}: {out[name][label]['psnr_mean']:.2f} dB {out[name][label]['ssim_mean']:.3f}",
                  flush=True)
    return out


def _arm_glob(run: str) -> str:
    """The runs of the same recipe as ``run`` (its seeds): ``seed1`` -> ``seed*``, ``original_from_seed1`` ->
    ``original_from_seed*``."""
    return run.rstrip("0123456789") + "*"


def arms(runs) -> dict[str, list[str]]:
    """Run names grouped by recipe: ``{"seed*": [...], "original_from_seed*": [...]}``."""
    out: dict[str, list[str]] = {}
    for run in sorted(runs):
        if run != "input" and not run.startswith("bm3d"):
            out.setdefault(_arm_glob(run), []).append(run)
    return out


def _cached_bm3d(work: Path) -> dict:
    """BM3D's full-set validation scores from an earlier ``validate`` (they do not depend on any model)."""
    old = work / "validation.json"
    if not old.exists():
        return {}
    out = {}
    for name, r in json.loads(old.read_text())["results"].items():
        for key, v in r.items():
            if key.startswith("bm3d_"):
                out[(name, float(v["factor"]))] = v
    return out


def validate(work: Path, version: int = 3) -> None:
    """Scores every seed and BM3D (factor tuned per dose here) on the held-out development patient; picks the seed
    (``ldct_tf.evaluate.selection.choose_seed``)."""
    from ldct_tf.evaluate import selection

    seeds = sorted(work.glob("*/generator.keras"))
    if not seeds:  # before BM3D's tuning (minutes) writes into ``work``
        raise FileNotFoundError(f"{work}: no */generator.keras to validate (run `python -m experiments.v3 train` first)")
    pairs = v3_data.mayo_pairs(v3_data.data_root(), v3_data.VALIDATION_PATIENT)
    conds = conditions(pairs, seed_base=1000)
    bm3d = bm3d_tuning(work, conds)
    denoisers = {"input": lambda hu: hu}
    denoisers.update({p.parent.name: keras_denoiser(p) for p in seeds})
    results = evaluate_all(conds, denoisers)
    cached = _cached_bm3d(work)
    for name, cases in conds.items():
        for point in ("psnr_optimal", "ssim_optimal"):
            factor = float(bm3d[name][point])
            cached[(name, factor)] = cached.get((name, factor)) or bm3d_scores(cases, factor)
            results[name][f"bm3d_{point}"] = cached[(name, factor)]
    mean_psnr = {p.parent.name: float(np.mean([results[c][p.parent.name]["psnr_mean"] for c in conds])) for p in seeds}
    picked = selection.choose_seed(mean_psnr)
    record = {"patient": v3_data.VALIDATION_PATIENT, "slices": len(pairs), "bm3d": bm3d, "results": results,
              "seed_mean_psnr_over_conditions": mean_psnr, "picked_seed": picked,
              "rule": "the run (recipe and seed) with the highest abdomen PSNR averaged over the four validation "
                      "conditions (ldct_tf.evaluate.selection.choose_seed)"}
    (work / "validation.json").write_text(json.dumps(record, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"v{version}_validation.json").write_text(json.dumps(record, indent=1))


def ship(work: Path, target: Path, version: int = 3) -> None:
    """Exports the seed that validation picked as a SavedModel version (refuses to replace an existing one)."""
    import keras

    from ldct_tf.export import export_generator
    from ldct_tf.models import blocks  # noqa: F401  (registers NoiseLevelMap for loading)

    record = json.loads((work / "validation.json").read_text())
    if target.exists():
        raise SystemExit(f"error: {target} exists; remove it first if you mean to replace it")
    generator = keras.saving.load_model(work / record["picked_seed"] / "generator.keras", compile=False)
    train_record = json.loads((work / record["picked_seed"] / "train.json").read_text())
    export_generator(generator, target.parent, version=int(target.name),
                     metadata={"recipe": f"v{version}: noise-conditional residual U-Net on simulated pairs, 5-50 % "
                                         "dose, sharp and smooth textures (python -m experiments.v3)",
                               "run": record["picked_seed"], "init": train_record.get("init"),
                               "seed": train_record["seed"], "steps": train_record["steps"],
                               "noise_rescale": train_record.get("noise_rescale", 0.0),
                               "validation": f"experiments/results/v{version}_validation.json"})


def _bootstrap_interval(values: np.ndarray, seed: int = 0, n: int = 2000) -> list[float]:
    rng = np.random.default_rng(seed)
    means = [float(np.mean(rng.choice(values, size=len(values)))) for _ in range(n)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _compare(results: dict, seeds: list[str], comparator: str, metric: str) -> dict:
    """v3 (mean over seeds, per slice) minus a comparator, per slice: mean, bootstrap 95 % interval over slices."""
    v3 = np.mean([results[s][metric] for s in seeds], axis=0)
    diff = v3 - np.asarray(results[comparator][metric])
    return {"mean": float(diff.mean()), "interval_95": _bootstrap_interval(diff), "slices_won": int((diff > 0).sum()),
            "slices": int(diff.size)}


def test(work: Path, version: int = 3) -> None:
    """The one read of the test patient: v3's seeds, BM3D at the factors validation chose per dose, v2, the input."""
    from ldct_tf.saved_model import SavedModelDenoiser

    validation = json.loads((work / "validation.json").read_text())
    out_file = RESULTS / f"v{version}_test.json"
    pairs = v3_data.mayo_pairs(v3_data.data_root(), v3_data.TEST_PATIENT)
    conds = conditions(pairs, seed_base=2000)
    seeds = sorted(p.parent.name for p in work.glob(f"{_arm_glob(validation['picked_seed'])}/generator.keras"))
    denoisers = {"input": lambda hu: hu}
    denoisers.update({s: keras_denoiser(work / s / "generator.keras") for s in seeds})
    v2 = SavedModelDenoiser(str(v3_data.REPO / "saved_models" / "ldct_denoiser" / "2"))
    denoisers["v2"] = lambda hu: np.asarray(v2(hu))
    results = evaluate_all(conds, denoisers)
    summary = {}
    for name, cases in conds.items():
        done = {}
        for point in ("psnr_optimal", "ssim_optimal"):
            factor = validation["bm3d"][name][point]
            done[factor] = done.get(factor) or bm3d_scores(cases, factor)
            results[name][f"bm3d_{point}"] = done[factor]
        r = results[name]
        summary[name] = {
            "v3_seeds_psnr": [r[s]["psnr_mean"] for s in seeds], "v3_seeds_ssim": [r[s]["ssim_mean"] for s in seeds],
            "v3_psnr_mean_sd": [float(np.mean([r[s]["psnr_mean"] for s in seeds])),
                                float(np.std([r[s]["psnr_mean"] for s in seeds]))],
            "v3_ssim_mean_sd": [float(np.mean([r[s]["ssim_mean"] for s in seeds])),
                                float(np.std([r[s]["ssim_mean"] for s in seeds]))],
            "bm3d_psnr_optimal": [r["bm3d_psnr_optimal"]["psnr_mean"], r["bm3d_psnr_optimal"]["ssim_mean"]],
            "bm3d_ssim_optimal": [r["bm3d_ssim_optimal"]["psnr_mean"], r["bm3d_ssim_optimal"]["ssim_mean"]],
            "v2": [r["v2"]["psnr_mean"], r["v2"]["ssim_mean"]], "input": [r["input"]["psnr_mean"], r["input"]["ssim_mean"]],
            "v3_minus_bm3d_psnr_optimal_psnr": _compare(r, seeds, "bm3d_psnr_optimal", "psnr"),
            "v3_minus_bm3d_ssim_optimal_ssim": _compare(r, seeds, "bm3d_ssim_optimal", "ssim"),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({"patient": v3_data.TEST_PATIENT, "slices": len(pairs), "seeds": seeds,
                                    "summary": summary, "results": results}, indent=1))
    print(json.dumps(summary, indent=1))


CONDITION_TEXT = {"real_25": "real 25 % dose (Mayo noise insertion)", "sim_10": "10 % dose, simulated",
                  "sim_25": "25 % dose, simulated", "sim_50": "50 % dose, simulated"}


def _validation_table(record: dict) -> list[str]:
    lines = ["| condition | input | recipe: mean of its 3 seeds (min-max) | BM3D PSNR-optimal (factor) | "
             "BM3D SSIM-optimal (factor) |", "|---|---|---|---|---|"]
    for name, r in record["results"].items():
        p, q = r["bm3d_psnr_optimal"], r["bm3d_ssim_optimal"]
        for arm, runs in arms(r).items():
            psnr = [r[s]["psnr_mean"] for s in runs]
            ssim = [r[s]["ssim_mean"] for s in runs]
            lines.append(f"| {CONDITION_TEXT[name]} | {r['input']['psnr_mean']:.2f} / {r['input']['ssim_mean']:.3f} | "
                         f"`{arm}`: {np.mean(psnr):.2f} ({min(psnr):.2f}-{max(psnr):.2f}) / {np.mean(ssim):.3f} "
                         f"({min(ssim):.3f}-{max(ssim):.3f}) | {p['psnr_mean']:.2f} / {p['ssim_mean']:.3f} "
                         f"({p['factor']:g}) | {q['psnr_mean']:.2f} / {q['ssim_mean']:.3f} ({q['factor']:g}) |")
    return lines


def _kernel_lines(record: dict) -> list[str]:
    """Validation per kernel (the held-out patient has both): every recipe (mean of its seeds), the input and BM3D at
    its PSNR optimum, PSNR / SSIM per condition and kernel."""
    first = next(iter(record["results"].values()))
    recipes = list(arms(first))
    lines = ["Per kernel, each recipe (mean of its seeds) beside the input and BM3D at its PSNR-optimal factor, "
             "PSNR / SSIM:", "",
             "| condition | kernel | slices | input | " + " | ".join(f"`{a}`" for a in recipes) + " | BM3D |",
             "|---|---|---|---|" + "---|" * len(recipes) + "---|"]

    def cell(runs: list[str], r: dict, idx: list[int]) -> str:
        psnr = np.mean([[r[s]["psnr"][i] for i in idx] for s in runs])
        ssim = np.mean([[r[s]["ssim"][i] for i in idx] for s in runs])
        return f"{psnr:.2f} / {ssim:.3f}"

    for name, r in record["results"].items():
        kernels = r["input"]["kernels"]
        groups = arms(r)
        for kernel in sorted(set(kernels)):
            idx = [i for i, k in enumerate(kernels) if k == kernel]
            lines.append(f"| {CONDITION_TEXT[name]} | {kernel} | {len(idx)} | {cell(['input'], r, idx)} | "
                         + " | ".join(cell(groups[a], r, idx) for a in recipes)
                         + f" | {cell(['bm3d_psnr_optimal'], r, idx)} |")
    return lines


def _test_table(record: dict) -> list[str]:
    lines = ["| condition | input | v2 | v3 mean ± SD over seeds | BM3D PSNR-opt. | BM3D SSIM-opt. | "
             "v3 − BM3D PSNR-opt. in PSNR (95 % CI, slices won) | v3 − BM3D SSIM-opt. in SSIM (95 % CI, slices won) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in record["summary"].items():
        dp, ds = s["v3_minus_bm3d_psnr_optimal_psnr"], s["v3_minus_bm3d_ssim_optimal_ssim"]
        lines.append(
            f"| {CONDITION_TEXT[name]} | {s['input'][0]:.2f} / {s['input'][1]:.3f} | {s['v2'][0]:.2f} / {s['v2'][1]:.3f} "
            f"| {s['v3_psnr_mean_sd'][0]:.2f} ± {s['v3_psnr_mean_sd'][1]:.2f} / {s['v3_ssim_mean_sd'][0]:.3f} ± "
            f"{s['v3_ssim_mean_sd'][1]:.3f} | {s['bm3d_psnr_optimal'][0]:.2f} / {s['bm3d_psnr_optimal'][1]:.3f} | "
            f"{s['bm3d_ssim_optimal'][0]:.2f} / {s['bm3d_ssim_optimal'][1]:.3f} | {dp['mean']:+.2f} dB "
            f"({dp['interval_95'][0]:+.2f} to {dp['interval_95'][1]:+.2f}; {dp['slices_won']}/{dp['slices']}) | "
            f"{ds['mean']:+.3f} ({ds['interval_95'][0]:+.3f} to {ds['interval_95'][1]:+.3f}; "
            f"{ds['slices_won']}/{ds['slices']}) |")
    return lines


def report(version: int = 3) -> None:
    """Markdown tables of the validation and test results files (experiments/results/v{version}_report.md)."""
    lines = [f"# v{version}: validation and test (written by `python -m experiments.v3 report --version {version}`)",
             "",
             "Abdomen-window PSNR (dB) / SSIM against the full-dose slice, mean over slices.", ""]
    validation = RESULTS / f"v{version}_validation.json"
    if validation.exists():
        record = json.loads(validation.read_text())
        lines += [f"## Validation: patient {record['patient']} ({record['slices']} slices), never trained on", "",
                  *_validation_table(record), "", *_kernel_lines(record), "",
                  f"Picked seed: {record['picked_seed']} ({record['rule']}).", ""]
        shipped = v3_data.REPO / "saved_models" / "ldct_denoiser" / str(version)
        if not shipped.exists():
            lines += [f"No version {version} was shipped: `saved_models/ldct_denoiser/{version}` does not exist "
                      "(`ship` was not run; the model card, `saved_models/ldct_denoiser/README.md`, says why).", "",
                      "Mean abdomen PSNR over the four conditions, per run (the figure the rule compares):", "",
                      "| recipe | runs (dB) | mean | range |", "|---|---|---|---|"]
            means = record["seed_mean_psnr_over_conditions"]
            for arm, runs in arms(means).items():
                values = [means[r] for r in runs]
                lines.append(f"| `{arm}` | " + ", ".join(f"{r} {means[r]:.3f}" for r in runs)
                             + f" | {np.mean(values):.3f} | {max(values) - min(values):.3f} |")
            lines.append("")
    test_file = RESULTS / f"v{version}_test.json"
    if test_file.exists():
        record = json.loads(test_file.read_text())
        lines += [f"## Test: patient {record['patient']} ({record['slices']} slices), read once", "",
                  *_test_table(record), ""]
    cost_json = cost_file(version)
    if cost_json.exists():
        cost = json.loads(cost_json.read_text())
        lines += [f"## Cost (`{cost_json.relative_to(v3_data.REPO)}`; this {cost['machine']['cpus']}-core CPU, "
                  f"{cost['machine']['note']})", "",
                  "| step | steps | CPU seconds | wall seconds |", "|---|---|---|---|",
                  f"| simulate (all source slices, summed over processes) | - | "
                  f"{cost['simulate']['cpu_seconds']:.0f} | - |"]
        lines += [f"| {k} | {v['steps']} | {v['cpu_seconds']:.0f} | {v['wall_seconds']:.0f} |"
                  for k, v in cost["runs"].items()]
        lines += ["", "| recipe | seeds | steps per seed | CPU seconds per seed (mean) | with the run it continues |"
                  " CPU seconds, all seeds |", "|---|---|---|---|---|---|"]
        lines += [f"| `{k}` | {v['seeds']} | {v['steps_per_seed']} | {v['cpu_seconds_per_seed_mean']:.0f} | "
                  f"{v.get('cpu_seconds_per_seed_including_init', v['cpu_seconds_per_seed_mean']):.0f} | "
                  f"{v['cpu_seconds_all_seeds']:.0f} |" for k, v in cost["per_recipe"].items()]
    (RESULTS / f"v{version}_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _chain_cpu(runs: dict, run: str) -> float:
    """CPU seconds of ``run`` and of every run it continues from (its ``init``, that run's ``init``, ...)."""
    total, seen = 0.0, set()
    while run in runs and run not in seen:  # ``seen``: a hand-edited train.json that names itself cannot loop
        seen.add(run)
        total += runs[run]["cpu_seconds"]
        run = runs[run].get("init")
    return total


def cost_file(version: int = 3) -> Path:
    """Where the training cost goes: with the benchmarks, since it is what a site budgets for, not a result."""
    return v3_data.REPO / "benchmarks" / "results" / f"v{version}_training_cost.json"


def cost(work: Path, version: int = 3) -> None:
    """Training and simulation cost per seed and per recipe (``benchmarks/results/v{version}_training_cost.json``), with the
    machine it ran on.  Wall seconds include waiting for the shared CPU; CPU seconds are what a site pays."""
    import multiprocessing
    import platform

    out: dict = {"machine": {"cpus": multiprocessing.cpu_count(), "processor": platform.processor() or
                             platform.machine(), "note": "several training processes shared the CPU, one thread "
                                                         "each: wall time is inflated, CPU seconds are not"},
                 "simulate": json.loads((work / "simulate.json").read_text()), "runs": {}, "per_recipe": {}}
    for f in sorted(work.glob("*/train.json")):
        out["runs"][f.parent.name] = {k: v for k, v in json.loads(f.read_text()).items() if k != "log"}
    for recipe, runs in arms(out["runs"]).items():
        cpu = [out["runs"][r]["cpu_seconds"] for r in runs]
        out["per_recipe"][recipe] = {"seeds": len(runs), "cpu_seconds_per_seed_mean": float(np.mean(cpu)),
                                     "cpu_seconds_all_seeds": float(np.sum(cpu)),
                                     "steps_per_seed": out["runs"][runs[0]]["steps"]}
        if all(out["runs"][r].get("init") in out["runs"] for r in runs):
            # a continuation: a seed's full cost includes every run it continues, back to the first
            out["per_recipe"][recipe]["cpu_seconds_per_seed_including_init"] = float(np.mean(
                [_chain_cpu(out["runs"], r) for r in runs]))
    cost_file(version).parent.mkdir(parents=True, exist_ok=True)
    cost_file(version).write_text(json.dumps(out, indent=1))


def validation_runs(work: Path, recipe: str) -> tuple[list[dict], dict, list[Path]]:
    """The validation patient's pairs, its conditions (the same noise realisations as ``validate``) and the
    ``generator.keras`` of every run of ``recipe`` (a glob such as ``original_from_seed*``) in ``work``."""
    runs = sorted(work.glob(f"{recipe}/generator.keras"))
    if not runs:
        raise FileNotFoundError(f"{work}: no {recipe}/generator.keras (run `python -m experiments.v3 train` first)")
    pairs = v3_data.mayo_pairs(v3_data.data_root(), v3_data.VALIDATION_PATIENT)
    return pairs, conditions(pairs, seed_base=1000), runs


def run_guide(argv, prog: str, description: str, measure, markdown, json_out: Path, md_out: Path) -> int:
    """The command of a measurement over the shipped recipe's seeds (``v3_strength``, ``v3_noise_gain``): parse
    ``--work``, ``measure(work)`` -> record, write it as JSON and ``markdown(record)`` as Markdown, print the latter.
    A missing run folder is one line and exit status 1."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--work", required=True, type=Path, help="the v3 work folder (with original_from_seed*/)")
    args = parser.parse_args(argv)
    try:
        record = measure(args.work)
    except FileNotFoundError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(record, indent=1))
    md_out.write_text(markdown(record))
    print(md_out.read_text())
    return 0
