"""``python -m ldct_tf.pipeline``: clinical DICOM -> de-identified, labelled, split TFRecord shards.

Runs unchanged on the DirectRunner and on Dataflow (or any Beam runner): every option this module does not know is
passed to Beam's PipelineOptions.  Examples::

    python -m ldct_tf.pipeline --input /data/ct --dose-manifest doses.csv --output /data/shards \\
        --salt "$SALT"    # DirectRunner; add --direct_num_workers N --direct_running_mode multi_processing on
                          # machines with many cores (on 2 cores it is no faster: benchmarks/results/pipeline.json)

    python -m ldct_tf.pipeline --input gs://bucket/ct --dose-manifest gs://bucket/doses.csv \\
        --output gs://bucket/shards --salt "$SALT" --runner DataflowRunner --project P --region R \\
        --temp_location gs://bucket/tmp --setup_file ./setup.py

Exit status 0 when the run finished, whatever it rejected (see ``OUT/rejected/`` and ``manifest.json``); 1 with a
one-line message for unusable inputs or output, 2 for a command line argparse cannot parse.  The command line itself is
``ldct_tf/pipeline/__main__.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from typing import Any, Sequence


import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from ldct_tf import records
from ldct_tf.errors import LdctError
from ldct_tf.pipeline import input_checks, site_local, transforms
from ldct_tf.pipeline.dose import DoseClassifier, DoseManifest, DoseManifestError, DoseRules, is_remote, normalise_path

SUMMARY_NAME = ".pipeline_summary.json"
FACTS_NAME = ".input_facts.json"
DEFAULT_SALT = "ldct_tf-default-salt"
_GLOB_CHARS = set("*?[")
#: --num-shards is per split and dose (x 6 files): 1024 already means 6,144 shard files, more than any site needs.
MAX_SHARDS = 1024


class UsageError(LdctError):
    """A problem with the command line's values or its inputs (no input files, an unusable output folder, no dose
    source); reported as one line, exit status 1."""


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Each --input -> a Beam match pattern (folders become ``folder/**``); lists the files they match (each once).

    Raises UsageError for an input that matches no file, so a typo never gives an empty dataset.
    """
    patterns, files = [], set()
    for raw in inputs:
        path = raw if is_remote(raw) else os.path.abspath(os.path.expanduser(raw))
        if not (_GLOB_CHARS & set(path)):
            is_dir = os.path.isdir(path) if not is_remote(path) else not FileSystems.exists(path)
            if is_dir:
                path = path.rstrip("/") + "/**"
        try:
            found = [m for result in FileSystems.match([path]) for m in result.metadata_list]
        except Exception as exc:  # Beam raises BeamIOError when nothing matches, or for unreachable buckets
            raise UsageError(f"--input {raw}: no input files found ({type(exc).__name__})") from None
        if not found:
            raise UsageError(f"--input {raw}: no input files found")
        patterns.append(path)
        files.update(normalise_path(m.path) for m in found)
    return patterns, sorted(files)


def _output_files(output: str, local: str) -> list[str]:
    """Files of an earlier run of this pipeline in ``output`` (shards, rejected lists, manifest)."""
    patterns = [f"{output}/{split}/{dose}-*{transforms.SHARD_SUFFIX}" for split in records.SPLITS
                for dose in records.DOSES]
    patterns += [f"{output}/rejected/rejected-*.jsonl", f"{output}/manifest.json", f"{output}/{SUMMARY_NAME}",
                 f"{output}/{FACTS_NAME}", *site_local.output_patterns(local)]
    found = []
    for result in FileSystems.match(patterns):
        found.extend(m.path for m in result.metadata_list)
    return found


def _real(path: str) -> str:
    """A local path with every symlink resolved (issue 27: an output reached through a link into an input)."""
    return path if is_remote(path) else os.path.realpath(path)


def _inside(folder: str, root: str) -> bool:
    folder, root = normalise_path(_real(folder)), normalise_path(_real(root))
    return folder == root or folder.startswith(root + "/")


def _check_outside_inputs(option: str, folder: str, patterns: Sequence[str]) -> None:
    for pattern in patterns:
        root = pattern.split("*", 1)[0].rstrip("/")
        if root and _inside(folder, root):
            raise UsageError(f"{option} {folder} is inside the input {pattern}; choose a folder outside it")


def prepare_output(output: str, patterns: Sequence[str], overwrite: bool, local: Optional[str] = None) -> str:
    """Check the output folder is usable before any work: writable, not inside an input (real paths compared), no
    earlier run unless asked; the site-local folder (``local``) must be outside the output and the inputs."""
    output = output.rstrip("/") if is_remote(output) else os.path.abspath(os.path.expanduser(output))
    local = site_local.folder_for(output, local)
    _check_outside_inputs("--output", output, patterns)
    _check_outside_inputs("--site-local", local, patterns)
    if _inside(local, output):
        raise UsageError(f"--site-local {local} is inside --output {output}: the output must be shareable whole")
    try:
        FileSystems.mkdirs(output)
    except Exception:
        pass  # exists already, or an object store without folders; the probe below decides
    probe = f"{output}/.write_probe-{uuid.uuid4().hex}"
    try:
        with FileSystems.create(probe) as handle:
            handle.write(b"ok")
        FileSystems.delete([probe])
    except Exception as exc:
        raise UsageError(f"--output {output} is not writable ({type(exc).__name__}: {exc})") from None
    earlier = _output_files(output, local)
    if earlier and not overwrite:
        raise UsageError(f"--output {output} already holds an earlier run ({len(earlier)} files); "
                         "pass --overwrite to replace it or choose another folder")
    if earlier:
        FileSystems.delete(earlier)
    return output


def build_pipeline(pipeline: beam.Pipeline, patterns: Sequence[str], output: str, classifier: DoseClassifier,
                   salt: str, fractions: dict[str, float], num_shards: int, local: Optional[str] = None) -> None:
    """Wire the transforms: read -> de-duplicate -> classify -> split -> encode -> write shards, rejected list (paths
    only in the site-local folder), summary and the facts behind the driver's warnings."""
    decoded = pipeline | "Inputs" >> beam.Create(list(patterns)) | "Read" >> transforms.ReadDicomSlices()
    unique = decoded.slices | "Deduplicate" >> input_checks.DeduplicateSlices()
    classified = unique.slices | "ClassifyDose" >> transforms.ClassifyDose(classifier)
    duplicates = (unique[input_checks.DUPLICATES] | "IdenticalCopies" >> beam.Filter(lambda x: isinstance(x, int))
                  | "CountDuplicates" >> beam.CombineGlobally(sum))
    conflicting = unique[input_checks.DUPLICATES] | "ConflictingCopies" >> beam.Filter(lambda x: isinstance(x, dict))
    facts = (classified.slices | "InputFacts" >> input_checks.InputFacts(salt, classifier.manifest)
         | "AddDuplicates" >> beam.Map(lambda facts, n: {**facts, "duplicates_dropped": int(n)},
                                        n=beam.pvalue.AsSingleton(duplicates))
         | "WriteFacts" >> beam.ParDo(transforms.WriteJson(f"{output}/{FACTS_NAME}")))
    assigned = classified.slices | "AssignSplit" >> transforms.AssignSplit(salt, fractions)
    encoded = assigned.slices | "ToExamples" >> transforms.ToExamples()
    shards = encoded | "WriteShards" >> transforms.WriteShards(output, num_shards)
    rejected = ((decoded[transforms.REJECTED], conflicting, classified[transforms.REJECTED],
                 assigned[transforms.REJECTED])
                | "AllRejected" >> beam.Flatten())
    rejected_files = (rejected | "Shareable" >> beam.Map(site_local.shareable, salt)
                      | "WriteRejected" >> transforms.WriteRejected(output))
    rejected_paths = rejected | "WriteRejectedPaths" >> site_local.WriteRejectedPaths(
        site_local.folder_for(output, local), salt)
    summary = ((encoded, rejected) | "Summarise" >> transforms.Summarise()
               | "WriteSummary" >> beam.ParDo(transforms.WriteJson(f"{output}/{SUMMARY_NAME}")))
    # One last transform that depends on every sink: Beam 2.77's DaskRunner computes only the last transform's
    # graph (dask_runner.py: "we can get away with computing just the last value"), which would skip the shards
    # and the rejected lists.  Harmless on every other runner.
    _ = (shards, rejected_files, rejected_paths, summary, facts) | "AllWritten" >> beam.Flatten()


def _counters(result) -> dict[str, int]:
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(transforms.NAMESPACE))
    except Exception:  # some runners do not report metrics
        return {}
    counters: dict[str, int] = {}
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[counter.key.metric.name] = counters.get(counter.key.metric.name, 0) + int(value or 0)
    return dict(sorted(counters.items()))


def _read_json(path: str) -> dict:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def write_manifest(output: str, options: dict, counters: dict[str, int], seconds: float, input_files: int,
                   num_shards: int, warnings: Sequence[str] = (), duplicates_dropped: int = 0) -> dict:
    """Merge the pipeline's summary with the run's options and shard list into ``OUT/manifest.json``."""
    summary_path = f"{output}/{SUMMARY_NAME}"
    summary = _read_json(summary_path)
    transforms.fill_missing_shards(output, summary["counts"], num_shards)
    shards = sorted(m.path for r in FileSystems.match([f"{output}/*/*{transforms.SHARD_SUFFIX}"])
                    for m in r.metadata_list)
    manifest = {
        "schema_version": records.SCHEMA_VERSION,
        **summary,
        "slices": int(sum(sum(d.values()) for d in summary["counts"].values())),
        "input_files": input_files,
        "duplicates_dropped": int(duplicates_dropped),
        "warnings": list(warnings),
        "shards": [s[len(output) + 1:] if s.startswith(output + "/") else s for s in shards],
        "pipeline_options": options,
        "counters": counters,
        "seconds": round(seconds, 2),
        "created_by": "ldct_tf.pipeline.dicom_to_tfrecord",
    }
    with FileSystems.create(f"{output}/manifest.json") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    FileSystems.delete([summary_path])
    return manifest


def print_summary(manifest: dict, output: str, out=None, local: Optional[str] = None) -> None:
    out = out or sys.stdout  # looked up at call time: notebooks and test runners replace sys.stdout
    local = site_local.folder_for(output, local)
    print(f"\nConverted {manifest['slices']} slices from {manifest['input_files']} files in "
          f"{manifest['seconds']:.1f} s into {output}", file=out)
    if manifest.get("duplicates_dropped"):
        print(f"dropped {manifest['duplicates_dropped']} duplicate slice(s): same SOP Instance UID as a slice "
              f"already converted (an input given twice, or copies of a file)", file=out)
    print(f"{'split':<6} {'low':>8} {'normal':>8}   patients (low/normal)", file=out)
    for split in records.SPLITS:
        c, p = manifest["counts"][split], manifest["patients"][split]
        print(f"{split:<6} {c['low']:>8} {c['normal']:>8}   {p['low']}/{p['normal']}", file=out)
    print(f"rejected: {manifest['rejected']}", file=out)
    for reason, n in manifest["rejected_by_reason"].items():
        print(f"  {reason:<28} {n}", file=out)
    if manifest["rejected"]:
        print(f"  (one line per rejected file in {output}/rejected/; their paths are only in "
              f"{local}/)", file=out)
    if manifest["counters"]:
        print("Beam counters: " + ", ".join(f"{k}={v}" for k, v in manifest["counters"].items()), file=out)
    for warning in manifest.get("warnings", []):
        print(f"WARNING: {warning}", file=out)
    print(f"Shareable: {output} as a whole. Keep {local}/ at your site "
          f"(it names your input paths).", file=out)


def run(args: Any, beam_args: Sequence[str] = ()) -> dict:
    """Validate, run the pipeline, write the manifest; returns it.  ``args`` holds the options of
    ``python -m ldct_tf.pipeline`` as attributes (its parser's namespace, see ``ldct_tf/pipeline/__main__.py``),
    ``beam_args`` Beam's own options.  Raises UsageError for bad usage."""
    return run_with_output(args, beam_args)[0]


def run_with_output(args: Any, beam_args: Sequence[str] = ()) -> tuple[dict, str]:
    """:func:`run`, also returning the output folder (which the shareable manifest does not name)."""
    beam_args = list(beam_args)
    try:
        fractions = transforms.parse_splits(args.splits)
        rules = DoseRules(args.low_dose_description, args.normal_dose_description, args.low_dose_max_ctdivol,
                          args.normal_dose_min_ctdivol, args.low_dose_max_mas, args.normal_dose_min_mas)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 1 <= args.num_shards <= MAX_SHARDS:
        raise UsageError(f"--num-shards must be between 1 and {MAX_SHARDS}, got {args.num_shards}")
    try:
        manifest = DoseManifest.load(args.dose_manifest) if args.dose_manifest else None
    except DoseManifestError as exc:
        raise UsageError(str(exc)) from None
    if manifest is None and rules.empty:
        raise UsageError("no dose source: give --dose-manifest CSV and/or dose rules "
                         "(--low-dose-max-ctdivol, --low-dose-description, ...)")
    salt = args.salt
    if not salt:
        print("WARNING: no --salt (or $LDCT_SALT): using the public default salt, so pseudonyms can be reversed "
              "by anyone who can guess patient IDs. Pass a secret salt for real patient data.", file=sys.stderr)
        salt = DEFAULT_SALT
    patterns, input_files = expand_inputs(args.input)
    n_files = len(input_files)
    output = prepare_output(args.output, patterns, args.overwrite, args.site_local)
    local = site_local.folder_for(output, args.site_local)

    # No path in the shareable manifest: input folders and file names may hold identifiers (site_local.py).
    options = {k: v for k, v in vars(args).items() if k not in ("salt", "input", "output", "dose_manifest", "site_local")}
    options.update(inputs=len(patterns), dose_manifest=bool(args.dose_manifest), splits=fractions,
                   default_salt=salt == DEFAULT_SALT,
                   salt_fingerprint=hashlib.sha256(f"fingerprint\x00{salt}".encode()).hexdigest()[:12],
                   beam_args=[a for a in beam_args if "/" not in a and "\\" not in a])  # paths (temp_location...) stay out
    site_local.write_run_file(local, {"input": patterns, "output": output, "dose_manifest": args.dose_manifest,
                                       "beam_args": list(beam_args)})
    print(f"Reading {n_files} files from {len(patterns)} input(s); writing to {output}", file=sys.stderr)
    start = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    build_pipeline(pipeline, patterns, output, DoseClassifier(manifest, rules), salt, fractions, args.num_shards,
                   local)
    result = pipeline.run()
    result.wait_until_finish()
    transforms.ensure_rejected_file(output)
    seconds = time.perf_counter() - start
    facts_path = f"{output}/{FACTS_NAME}"
    facts = _read_json(facts_path)
    FileSystems.delete([facts_path])
    counts = _read_json(f"{output}/{SUMMARY_NAME}")["counts"]
    warnings = (input_checks.manifest_warnings(manifest, input_files, facts.get("series_matched", []), salt)
                + input_checks.patient_warnings(facts, counts))
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    written = write_manifest(output, options, _counters(result), seconds, n_files, args.num_shards, warnings,
                             facts.get("duplicates_dropped", 0))
    return written, output
