"""``python -m ldct_tf.denoise INPUT OUTPUT [--model PATH | --server URL]``: DICOM in, denoised DICOM out.

INPUT is a CT file, a series folder or a folder of studies; every CT series found becomes a new *derived* series in
OUTPUT (``ldct_tf.dicom.derived_dataset``: new Series/SOP Instance UIDs, ImageType DERIVED\\SECONDARY, the input's
pixel type and rescale, every patient, study and geometry tag kept), so that a PACS viewer shows it beside the
original.  OUTPUT mirrors INPUT's folder layout and file names; a folder that holds several series gets one
``series_N`` subfolder per series.

Why the work is split the way it is: the core (:func:`denoise`) takes any *denoiser*, a callable from a float32 HU
batch ``[N, H, W]`` to a denoised HU batch of the same shape, so that a local SavedModel
(``ldct_tf.export.SavedModelDenoiser``), a TF Serving endpoint (``ldct_tf.denoise.serving_client.ServingClient``) and the tests'
plain functions all run through the same code.  Files are read twice (a scan that groups and checks every file, then
the batch-by-batch pass that denoises and writes), so that bad files are known and reported before anything is
written and memory stays at one batch of slices however large the input is.

Never writes into INPUT: an OUTPUT inside INPUT is refused, and so is any output file that would replace an input file.
Never leaves a partial series: a series with a slice that fails the plausibility checks (``ldct_tf.dicom.plausibility``,
the pipeline's checks) is not written at all, the output's writability and path lengths are checked before the model
runs, and each series is staged and moved into place whole (``ldct_tf.denoise.output``).  Every file written is
recorded in ``OUTPUT/.ldct_tf_denoise_outputs.json``; ``--overwrite`` deletes exactly those files (no stale slice or
audit PNG of an earlier run survives) and never replaces a file that is not on that list.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ldct_tf import audit, dicom
from ldct_tf.dicom import ai_marking
from ldct_tf.denoise import checks as input_checks_mod
from ldct_tf.denoise import output as denoise_output
from ldct_tf.denoise import overview as overview_mod
# The planning half of a run (what is read, what is written where); re-exported as part of this API.
from ldct_tf.denoise.plan import (MAX_PIXELS, RefusedSeries, SeriesPlan, Skipped, _warn_skipped,  # noqa: F401
                                  check_outputs, check_paths, drop_duplicates, list_files, plan, scan)

log = logging.getLogger("ldct_tf.denoise")

#: Float32 HU batch [N, H, W] -> denoised float32 HU batch, same shape.
Denoiser = Callable[[np.ndarray], np.ndarray]

REPO = Path(__file__).resolve().parents[2]  # ldct_tf/STAGE/this file -> the checkout
DEFAULT_MODEL = REPO / "saved_models" / "ldct_denoiser"
DEFAULT_SERVER_MODEL = "ldct_denoiser"
DEFAULT_BATCH_SIZE = 8
#: A model's smallest input side when it does not say (twice the size multiple 8 of the shipped model; see
#: ``ldct_tf.export.graph.min_input_size``).
DEFAULT_MIN_SIZE = 16


def package_version() -> str:
    try:
        return importlib.metadata.version("ldct_tf")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "(not installed)"


DenoiseError = denoise_output.DenoiseError  # a problem with the command as a whole: one line, exit status 1


@dataclass(frozen=True)
class ModelInfo:
    """What produced the denoised series, written into every derived file's DerivationDescription."""

    name: str
    version: str
    where: str  # "SavedModel" or "TF Serving": how it was run
    strength: Optional[float] = None  # None: the model's default, not known to this side (a server's model)
    min_size: int = DEFAULT_MIN_SIZE  # the smallest height and width the model answers (its metadata's min_size)

    def derivation_description(self) -> str:
        return (f"Low-dose CT denoised by ldct_tf {package_version()} (denoising network): model {self.name} "
                f"version {self.version} via {self.where}, {ai_marking.strength_text(self.strength)}; "
                f"{ai_marking.RESEARCH_USE}")

    def ai_model(self) -> ai_marking.AIModel:
        """What the derived files' Contributing Equipment Sequence says made them (``ldct_tf.dicom.ai_marking``)."""
        return ai_marking.AIModel(self.name, self.version, package_version(), self.where, self.strength)

    def series_suffix(self) -> str:
        return f" denoised {self.name} v{self.version}"


@dataclass
class DenoiseSummary:
    series: int = 0
    slices: int = 0
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)
    refused: list[RefusedSeries] = field(default_factory=list)  # series not written: some slices were unusable
    folders: list[Path] = field(default_factory=list)  # one output folder per derived series
    audits: list[Path] = field(default_factory=list)  # one audit sidecar per derived series (unless --no-audit)
    flagged_slices: int = 0  # slices the audit flagged, over all series
    overwrite: bool = False  # whether this run may replace earlier outputs
    started: float = field(default_factory=time.perf_counter)
    input_checks: list[input_checks_mod.SeriesCheck] = field(default_factory=list)  # failed checks, one per problem
    overview: str = ""  # the one-screen summary (Markdown), also in OUTPUT/summary.md

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (f"denoised {self.series} series, {self.slices} slices in {self.seconds:.1f} s "
                f"({self.slices_per_second:.2f} slices/s)")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} file(s)"
        if self.refused:
            text += f"; refused {len(self.refused)} series with unusable slices"
        if self.input_checks:
            text += f"; {len(self.input_checks)} input check(s) failed"
        if self.audits:
            text += f"; audit flagged {self.flagged_slices} slice(s) (see audit/ in each series folder)"
        return text


# --------------------------------------------------------------------------------------------------- denoising

def _batches(paths: Sequence[tuple[Path, Path]], batch_size: int):
    for start in range(0, len(paths), batch_size):
        yield paths[start:start + batch_size]


def _run_denoiser(denoiser: Denoiser, hu: np.ndarray, model: ModelInfo) -> np.ndarray:
    try:
        out = np.asarray(denoiser(hu), dtype=np.float32)
    except ValueError as exc:  # SavedModelDenoiser reports the graph's InvalidArgument errors this way
        raise DenoiseError(f"model {model.name} v{model.version}: {exc}") from None
    if out.shape != hu.shape:
        raise DenoiseError(f"model {model.name} v{model.version} returned shape {out.shape} for input {hu.shape}")
    if not np.all(np.isfinite(out)):
        raise DenoiseError(f"model {model.name} v{model.version} returned NaN or Inf values")
    return out


def denoise_series(item: SeriesPlan, denoiser: Denoiser, model: ModelInfo, batch_size: int,
                   bar: Optional[tqdm] = None, output: Optional[Path] = None,
                   auditor: Optional[audit.SeriesAudit] = None, deidentifier=None,
                   overview: Optional[overview_mod.SeriesOverview] = None,
                   record: Optional[denoise_output.OutputRecord] = None) -> tuple[int, list[Skipped]]:
    """Denoise and write one series, ``batch_size`` slices per denoiser call; returns (slices written, skipped).

    The files are staged under ``output`` (default: the series folder) and moved into place when the whole series
    is written; on any error (a file that changed since the scan included) nothing of the series is left.
    ``auditor`` audits every written slice against its input (``ldct_tf.audit``); ``deidentifier`` (a
    ``ldct_tf.dicom.deidentify.Deidentifier`` shared by the run) de-identifies the derived files; ``overview``
    keeps the run overview's sample slices; ``record`` (the output's ``OutputRecord``) learns every file written,
    for a later ``--overwrite``.
    """
    derived = dicom.DerivedSeries.new(model.derivation_description(), model.series_suffix(), model=model.ai_model(),
                                      deidentifier=deidentifier)
    skipped: list[Skipped] = []
    final_audit = auditor.folder if auditor is not None else None
    try:
        written = _write_series(item, denoiser, model, batch_size, bar, output, auditor, final_audit, derived,
                                skipped, overview, record)
    except audit.AuditWriteError as exc:  # a full disk under the audit: one line, nothing of the series left
        raise DenoiseError(f"{final_audit}: cannot write the audit ({exc.reason}); its series was not written "
                           f"(free space, or pass --no-audit)") from None
    finally:
        if auditor is not None:
            auditor.folder = final_audit
    return written, skipped


def _write_series(item: SeriesPlan, denoiser: Denoiser, model: ModelInfo, batch_size: int, bar: Optional[tqdm],
                  output: Optional[Path], auditor: Optional[audit.SeriesAudit], final_audit: Optional[Path],
                  derived: dicom.DerivedSeries, skipped: list, overview: Optional[overview_mod.SeriesOverview],
                  record: Optional[denoise_output.OutputRecord]) -> int:
    """:func:`denoise_series`' staged write: every slice and the audit under a staging folder, then the commit."""
    written = 0
    with denoise_output.StagedSeries(output or item.folder, record) as staged:
        if final_audit is not None:  # the audit's PNGs and sidecar are staged with the series they describe
            auditor.folder = staged.path_for(final_audit / audit.SIDECAR).parent
        for chunk in _batches(list(zip(item.files, item.outputs)), batch_size):
            written += _write_chunk(chunk, denoiser, model, derived, staged, bar, auditor, skipped, overview)
        if final_audit is not None:
            if written:
                auditor.write()
                for staged_file in auditor.folder.iterdir():
                    if staged_file.name != audit.SIDECAR:
                        staged.path_for(final_audit / staged_file.name)
            auditor.folder = final_audit
        staged.commit()
    return written


def _write_chunk(chunk, denoiser: Denoiser, model: ModelInfo, derived: dicom.DerivedSeries,
                 staged: denoise_output.StagedSeries, bar: Optional[tqdm], auditor: Optional[audit.SeriesAudit],
                 skipped: list, overview: Optional[overview_mod.SeriesOverview] = None) -> int:
    written, loaded = 0, []
    for path, out in chunk:
        try:
            ds, hu, info = dicom.read_ct_dataset(path)
        except dicom.NotUsableCT as exc:
            raise DenoiseError(f"{path}: changed since the scan ({exc.reason}: {exc.detail}); its series was not "
                               f"written") from None
        loaded.append((ds, hu, out, info))
    start = 0  # one denoiser call per run of equal-sized slices (a series may mix sizes, a batch cannot)
    while start < len(loaded):
        end = start + 1
        while end < len(loaded) and loaded[end][1].shape == loaded[start][1].shape:
            end += 1
        group = loaded[start:end]
        denoised = _run_denoiser(denoiser, np.stack([hu for _, hu, _, _ in group]).astype(np.float32), model)
        for (ds, hu, out, info), slice_hu in zip(group, denoised):
            try:
                written_ds = dicom.write_derived_slice(ds, slice_hu, derived, staged.path_for(out))
            except OSError as exc:
                raise DenoiseError(f"{out}: cannot write ({exc.strerror or type(exc).__name__})") from None
            except ValueError as exc:  # the scan refused what it knows of; never leave the series partial
                raise DenoiseError(f"{out.name}: cannot be written ({exc}); its series was not written") from None
            written += 1
            if auditor is not None:
                auditor.add(hu, slice_hu, info.pixel_spacing_mm, int(written_ds.get("InstanceNumber", 0) or 0),
                            str(written_ds.SOPInstanceUID))
            if overview is not None:
                overview.add(out, ds, hu, slice_hu, written_ds, info.pixel_spacing_mm)
        if bar is not None:
            bar.update(len(group))
        start = end
    return written


def _prepare(input_path: Path, output: Path, model: ModelInfo, summary: "DenoiseSummary", progress: Optional[bool],
             deidentify: bool, max_pixels: Optional[int], check_inputs: bool,
             force: bool) -> tuple[list[SeriesPlan], denoise_output.OutputRecord]:
    """Scan, drop duplicate instances, check the inputs (``check_inputs``) and plan the outputs; fills ``summary``.
    Returns the plans and the record of what earlier runs wrote into OUTPUT (all that ``--overwrite`` may replace)."""
    files = list_files(input_path)
    series, skipped, refused = scan(files, progress, deidentify=deidentify, max_pixels=max_pixels)
    dup_skipped, dup_refused = drop_duplicates(series)
    summary.skipped.extend(skipped + dup_skipped)
    summary.refused.extend(refused + dup_refused)
    if check_inputs:
        summary.input_checks = input_checks_mod.check_all(series, model.min_size, force, log.warning)
    plans = plan(input_path, output, series, anonymous_names=deidentify)
    record = denoise_output.OutputRecord(output)
    check_outputs(plans, files, summary.overwrite, record)
    return plans, record


def _write_overview(output: Path, model: ModelInfo, summary: "DenoiseSummary",
                    overviews: Sequence[overview_mod.SeriesOverview], force: bool,
                    record: denoise_output.OutputRecord) -> None:
    """Panels for each written series under OUTPUT/audit/overview/ and the summary in OUTPUT/summary.md, both
    recorded for a later ``--overwrite``.  A ``summary.md`` that no earlier run wrote is the user's: left alone."""
    figures = [figure for item in overviews for figure in item.finish(output / overview_mod.OVERVIEW_FOLDER)]
    summary.overview = overview_mod.summary_markdown(
        f"{model.name} version {model.version} ({model.where})", overviews, summary.input_checks, force,
        len(summary.skipped), len(summary.refused), time.perf_counter() - summary.started)
    target = output / overview_mod.SUMMARY_FILE
    if target.exists() and not record.owns(target):
        log.warning("%s exists and was not written by ldct_tf.denoise: left unchanged (the summary is printed)",
                    target)
        target = None
    try:
        output.mkdir(parents=True, exist_ok=True)
        if target is not None:
            target.write_text(summary.overview)
    except OSError as exc:
        raise DenoiseError(f"{target}: cannot write ({exc.strerror or type(exc).__name__})") from None
    folders = [output / overview_mod.OVERVIEW_FOLDER, output / overview_mod.OVERVIEW_FOLDER.parent] if figures else []
    record.add(figures + ([target] if target is not None else []), folders)


def denoise(input_path: str | os.PathLike, output: str | os.PathLike, denoiser: Denoiser, model: ModelInfo, *,
            batch_size: int = DEFAULT_BATCH_SIZE, overwrite: bool = False,
            progress: Optional[bool] = None, audit_series: bool = True, audit_config: Optional[str] = None,
            deidentify: bool = False, pseudonym_salt: Optional[str] = None,
            max_pixels: Optional[int] = MAX_PIXELS, check_inputs: bool = False, force: bool = False,
            overview: Optional[bool] = None) -> DenoiseSummary:
    """Denoise every CT series under ``input_path`` into derived series under ``output``.

    ``audit_series`` writes each series' change audit (``ldct_tf.audit``) to ``SERIES_FOLDER/audit/``;
    ``deidentify`` writes the derived series under the PS3.15 basic profile (``ldct_tf.dicom.deidentify``; pseudonyms
    keyed by ``pseudonym_salt``, random when None) with anonymous folder and file names.  ``max_pixels`` refuses
    larger slices before decoding them.  ``check_inputs`` (the command's default) skips, with one line each, series
    that look normal-dose, show another body region or kernel, or are smaller than ``model.min_size``
    (``ldct_tf.denoise.checks``), unless ``force``.  ``overview`` (default: with the audit) writes the run overview
    (``ldct_tf.denoise.overview``): panels under ``OUTPUT/audit/overview/`` and ``OUTPUT/summary.md``.

    Files that are not usable CT are skipped with a warning naming them (``summary.skipped``), and so are repeated
    copies of one SOP instance; a series with an unusable slice, or two different images under one SOP Instance UID,
    is not written at all (``summary.refused``, never a partial series); problems with the command as a whole
    (paths, a model that returns the wrong shape) raise :class:`DenoiseError`.  ``progress`` None shows the bar
    only on a terminal.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise DenoiseError(f"{input_path}: input not found")
    check_paths(input_path, output)
    summary = DenoiseSummary(overwrite=overwrite)
    plans, record = _prepare(input_path, output, model, summary, progress, deidentify, max_pixels, check_inputs,
                             force)
    # before the model runs: a path the file system cannot hold fails now, not after the first series
    denoise_output.check_path_lengths(output, [out for item in plans for out in item.outputs])
    if denoise_output.remove_stale_staging(output):
        log.warning("removed the partial series that an interrupted earlier run left in %s", output)
    if overwrite and (record.files or record.folders):
        log.info("--overwrite: removed the %d file(s) an earlier run wrote in %s", record.remove_recorded(), output)
    deidentifier = None
    if deidentify:
        from ldct_tf.dicom.deidentify import Deidentifier

        deidentifier = Deidentifier(pseudonym_salt)
    overviews = []
    disable = None if progress is None else not progress
    with tqdm(total=sum(len(p.files) for p in plans), desc="denoising", unit="slice", disable=disable) as bar:
        for item in plans:
            auditor = audit.new_series_audit(item.folder / audit.AUDIT_FOLDER, audit_config) if audit_series \
                else None
            sample = overview_mod.SeriesOverview.for_series(len(overviews) + 1, item.outputs)
            written, late = denoise_series(item, denoiser, model, batch_size, bar, output, auditor, deidentifier,
                                           sample, record)
            summary.skipped.extend(late)
            if written:
                summary.series += 1
                summary.slices += written
                summary.folders.append(item.folder)
                sample.slices = written
                overviews.append(sample)
                if auditor is not None:
                    summary.audits.append(auditor.folder / audit.SIDECAR)
                    sample.flagged = auditor.report()["flagged_slices"]
                    summary.flagged_slices += sample.flagged
    if (audit_series if overview is None else overview) and summary.slices:
        _write_overview(output, model, summary, overviews, force, record)
    summary.seconds = time.perf_counter() - summary.started
    return summary


# --------------------------------------------------------------------------------------------------- models

def load_saved_model(path: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE,
                     strength: Optional[float] = None) -> tuple[Denoiser, ModelInfo]:
    """A local SavedModel: a model folder (newest version) or one version's folder, run at ``strength`` (None: the
    model's default; see :mod:`ldct_tf.saved_model`)."""
    _check_strength(strength)
    path = Path(path)
    if not path.exists() or not (path.is_dir() and (any(p.name.isdigit() for p in path.iterdir())
                                                    or (path / "saved_model.pb").exists())):
        hint = ("export one with `python -m ldct_tf.export --model-dir MODEL_DIR --replace-default-model` "
                "(MODEL_DIR from `python -m ldct_tf.train`), or pass --model PATH or --server URL")
        raise DenoiseError(f"{path}: no exported model here; {hint}")
    from ldct_tf.export import SavedModelDenoiser  # TensorFlow is imported only when a local model is used

    try:
        loaded = SavedModelDenoiser(path, batch_size=batch_size, strength=strength)
    except (FileNotFoundError, ValueError) as exc:
        raise DenoiseError(str(exc)) from None
    meta = loaded.metadata
    min_size = int(meta.get("min_size") or 2 * int(meta.get("size_multiple") or DEFAULT_MIN_SIZE // 2))
    return loaded, ModelInfo(str(loaded.name), str(loaded.version), "SavedModel", loaded.strength, min_size)


def _check_strength(strength: Optional[float]) -> None:
    """A strength outside [0, 1] is the command's error (one line, exit 1), found before any model is loaded."""
    if strength is not None:
        from ldct_tf.saved_model import check_strength

        try:
            check_strength(strength)
        except ValueError as exc:
            raise DenoiseError(str(exc)) from None


def connect_server(url: str, model_name: str = DEFAULT_SERVER_MODEL, version: Optional[int] = None,
                   timeout_s: float = 60.0, batch_size: int = DEFAULT_BATCH_SIZE,
                   strength: Optional[float] = None) -> tuple[Denoiser, ModelInfo]:
    """A TF Serving endpoint (REST ``http://host:8501`` or gRPC ``host:8500``; see ``ldct_tf.denoise.serving_client``).

    Asks the server for the model's status first, so that a wrong URL or model name fails before any file is read,
    and so that the derived series can name the version that actually answers (the newest AVAILABLE one unless
    ``version`` pins one).  ``strength`` None leaves the server's model at its default (sent otherwise).
    """
    from ldct_tf.denoise.serving_client import ServingClient, ServingError

    _check_strength(strength)
    try:
        client = ServingClient(url, model=model_name, version=version, timeout_s=timeout_s, batch_size=batch_size,
                               strength=strength)
        status = client.status()
    except (ValueError, ServingError, OSError) as exc:
        raise DenoiseError(f"TF Serving at {url}, model {model_name!r}: {exc}") from None
    available = [int(v["version"]) for v in status.get("versions", []) if v.get("state") == "AVAILABLE"]
    if not available:
        raise DenoiseError(f"TF Serving at {url}: model {model_name!r} has no AVAILABLE version "
                           f"({status.get('versions')})")
    shown = str(version) if version is not None else str(max(available))

    def predict(hu: np.ndarray) -> np.ndarray:
        try:
            return client.predict(hu)
        except ServingError as exc:
            raise DenoiseError(f"TF Serving at {url}: {exc}") from None

    return predict, ModelInfo(model_name, shown, "TF Serving", strength)
