"""``python -m ldct_tf.simulate pairs``: the simulated-pair stream, a Beam stage beside the low and normal shards.

    python -m ldct_tf.simulate pairs --data SHARDS --calibration calibration.json --realisations 4

Reads the normal-dose shards of one split (``train`` by default) of a ``python -m ldct_tf.pipeline`` output, makes
``--realisations`` calibrated low-dose realisations of every slice (``ldct_tf.simulate.ProjectionSimulator``: one
projection per slice, one FBP per realisation) with the reference of each, and writes them as
``SHARDS/{split}/simulated-SSSSS-of-NNNNN.tfrecord.gz`` (``ldct_tf.records.encode_simulated``).  The manifest gains a
``simulated`` entry (counts, realisations, the calibration used, the cost per slice).

The projection costs 7-15 s per 512 x 512 slice on one core, so this is a separate, embarrassingly parallel stage:
every slice is one element, and Dataflow (or any Beam runner; unknown options go to Beam) spreads them over workers.
Training never waits for it.  ``--reference original`` (the default) adds the reconstructed noise to the slice
itself, as Mayo's noise insertion does; ``projected`` uses the slice through the projector, whose round trip blurs
edges (``ldct_tf.simulate.REFERENCES``) and teaches the denoiser that blur.  ``--textures mixed`` (the default)
gives every odd realisation the noise texture of another calibrated FBP filter (``texture_of``).  Noise seeds derive from the slice's pseudonym, position and realisation number, so a
re-run writes the same pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Iterable, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import apache_beam as beam  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from ldct_tf import data as data_lib  # noqa: E402
from ldct_tf import records  # noqa: E402
from ldct_tf.simulate import SimulationError  # noqa: E402
from ldct_tf.simulate import calibration as calibration_lib  # noqa: E402

SIMULATED = "simulated"


def shard_pattern(data: str, split: str, stream: str) -> str:
    return f"{data.rstrip('/')}/{split}/{stream}-*.tfrecord.gz"


def noise_seed(patient: str, instance: int, z_mm: float, realisation: int) -> int:
    """Deterministic seed of one realisation (pseudonyms only: no identifier is hashed here)."""
    digest = hashlib.sha256(f"{patient}\x00{instance}\x00{z_mm:.3f}\x00{realisation}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_i0(params: dict, seed: int) -> float:
    """An i0 drawn log-uniformly over the calibration's per-slice range (the fitted i0 when there is no range):
    real patients differ in noise for the same protocol, and a denoiser trained on one level under- or over-smooths
    the others."""
    import numpy as np

    low, high = params.get("i0_range") or (params["i0"], params["i0"])
    return float(np.exp(np.random.default_rng(seed ^ 0x5EED).uniform(np.log(low), np.log(high))))


def texture_of(variants: Sequence[dict], realisation: int) -> dict:
    """Even realisations get the fitted texture (``variants[0]``); odd ones cycle through the other filters, so half
    of the stream matches the calibrated kernel and the rest spans sharper to smoother noise."""
    if realisation % 2 == 0 or len(variants) == 1:
        return variants[0]
    return variants[1 + (realisation // 2) % (len(variants) - 1)]


class SimulatePairsFn(beam.DoFn):
    """One normal-dose slice -> ``realisations`` encoded simulated pairs (or one rejection line)."""

    def __init__(self, calibration: dict, realisations: int, reference: str = "original",
                 textures: str = "mixed", total: Optional[int] = None, progress: Optional[bool] = False) -> None:
        self.calibration = calibration
        self.realisations = realisations
        self.reference = reference
        self.textures = textures
        # A bar over the slices (each costs seconds): made on the worker, as a bar cannot be pickled; ``progress``
        # None draws it only when the worker's stderr is a terminal (the local runner's is the user's).
        self.total, self.progress, self._bar = total, progress, None
        self.pairs = beam.metrics.Metrics.counter("simulate", "pairs_written")
        self.skipped = beam.metrics.Metrics.counter("simulate", "slices_skipped_not_square")
        self.seconds = beam.metrics.Metrics.distribution("simulate", "milliseconds_per_slice")

    def process(self, serialized: bytes) -> Iterable[bytes]:
        import numpy as np

        from ldct_tf.simulate import calibration as calibration_lib
        from ldct_tf import ct, simulate

        started = time.perf_counter()
        item = records.decode_numpy(serialized)
        hu = item["image"].astype(np.float64)
        if hu.shape[0] != hu.shape[1]:
            self.skipped.inc()
            return
        variants = (calibration_lib.texture_variants(self.calibration, item["kernel"]) if self.textures == "mixed"
                    else [calibration_lib.simulation_parameters(self.calibration, item["kernel"])])
        spacing = tuple(float(v) for v in item["pixel_spacing_mm"])
        simulator = simulate.ProjectionSimulator(hu, float(np.mean(spacing)))
        for k in range(self.realisations):
            params = texture_of(variants, k)
            seed = noise_seed(item["patient"], item["instance"], item["z_mm"], k)
            i0 = sample_i0(params, seed)
            low, reference = simulator.pair(params["dose_fraction"], i0, params["electronic_noise"], seed=seed,
                                            noise_model=params["noise_model"], filter_name=params["filter_name"],
                                            reference=self.reference)
            reference = ct.hu_to_int16(reference)
            self.pairs.inc()
            yield records.encode_simulated(records.SimulatedPairRecord(
                low=ct.hu_to_int16(low), reference=reference, patient=item["patient"], kernel=item["kernel"],
                split=item["split"], realisation=k, i0=i0, dose_fraction=params["dose_fraction"],
                filter_name=params["filter_name"], pixel_spacing_mm=spacing))
        self.seconds.update(int(1000 * (time.perf_counter() - started)))
        self._advance()

    def _advance(self) -> None:
        from ldct_tf.simulate import calibration as calibration_lib

        if self._bar is None:
            self._bar = calibration_lib.progress_bar(self.total, "simulating pairs", self.progress)
        self._bar.update(1)
        if self.total is not None and self._bar.n >= self.total:
            self.teardown()

    def teardown(self) -> None:
        if self._bar is not None:
            self._bar.close()


def build_pipeline(pipeline: beam.Pipeline, data: str, split: str, calibration: dict, realisations: int,
                   num_shards: int, reference: str = "original", textures: str = "mixed",
                   total: Optional[int] = None, progress: Optional[bool] = False) -> None:
    (pipeline
     | "ReadNormal" >> beam.io.ReadFromTFRecord(shard_pattern(data, split, "normal"))
     | "Reshuffle" >> beam.Reshuffle()  # one slice per work item: the projection is the expensive part
     | "Simulate" >> beam.ParDo(SimulatePairsFn(calibration, realisations, reference, textures, total,
                                                          progress))
     | "Write" >> beam.io.WriteToTFRecord(f"{data.rstrip('/')}/{split}/{SIMULATED}", file_name_suffix=".tfrecord.gz",
                                          num_shards=num_shards, shard_name_template="-SSSSS-of-NNNNN"))


def _counter(result, name: str) -> int:
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return int(sum(c.committed or c.attempted or 0 for c in found))


def run(data: str, calibration: str, realisations: int = 4, split: str = "train", num_shards: int = 1,
        reference: str = "original", textures: str = "mixed", overwrite: bool = False,
        beam_args: Sequence[str] = (), progress: Optional[bool] = None) -> dict:
    """Run the stage on the shards in ``data`` with the calibration JSON ``calibration``; returns the manifest's new
    ``simulated`` entry.  ``beam_args`` are Beam's own options (``--runner``, ...); ``progress`` the bar over slices
    (None: when stderr is a terminal).  Raises
    :class:`ldct_tf.simulate.SimulationError` (or ``FileNotFoundError`` for a folder without a manifest) for unusable
    input."""
    if realisations < 1 or num_shards < 1:
        raise SimulationError("--realisations and --num-shards must be >= 1")
    try:
        manifest = data_lib.read_manifest(data)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    if data_lib.slice_count(manifest, split, "normal") == 0:
        raise SimulationError(f"{data}: split {split!r} has no normal-dose slices to simulate from")
    fitted = calibration_lib.load(calibration)
    return _simulate(manifest, data, fitted, realisations, split, num_shards, reference, textures, overwrite,
                     beam_args, progress)


def _simulate(manifest: dict, data: str, calibration: dict, realisations: int, split: str, num_shards: int,
              reference: str, textures: str, overwrite: bool, beam_args: Sequence[str],
              progress: Optional[bool] = None) -> dict:
    """The checked run: replace an earlier stream if asked, run the Beam pipeline, record it in the manifest."""
    existing = FileSystems.match([shard_pattern(data, split, SIMULATED)])[0].metadata_list
    if existing and not overwrite:
        raise SimulationError(f"{data}: split {split!r} already has simulated shards; pass --overwrite")
    if existing:
        FileSystems.delete([m.path for m in existing])  # this stage's own earlier output only
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions(list(beam_args)))
    build_pipeline(pipeline, data, split, calibration, realisations, num_shards, reference, textures,
                   data_lib.slice_count(manifest, split, "normal"), progress)
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - started
    pairs = _counter(result, "pairs_written")
    slices = data_lib.slice_count(manifest, split, "normal")
    entry = manifest.setdefault(SIMULATED, {})
    entry[split] = {
        "pairs": pairs, "source_slices": slices, "realisations": realisations, "reference": reference,
        "textures": textures,
        "schema_version": records.SIMULATED_SCHEMA_VERSION,
        "calibration": {k: calibration_lib.simulation_parameters(calibration, k) for k in calibration["kernels"]},
        "default_kernel": calibration.get("default_kernel"),
        "seconds": round(seconds, 1), "seconds_per_source_slice": round(seconds / max(slices, 1), 2),
    }
    with FileSystems.create(f"{data.rstrip('/')}/manifest.json") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    return entry[split]
