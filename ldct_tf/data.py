"""tf.data input from the pipeline's shards.

``slice_dataset`` reads one split (and optionally one dose) back as ``(hu, metadata)`` pairs exactly as the pipeline
wrote them: HU float32 ``[height, width, 1]`` and the record's other features.  The training input is built on top of
it: two independent, never-paired streams of random patches (low-dose and normal-dose), and whole validation slices,
paired by patient and position where the data has both doses of the same slice.
"""

from __future__ import annotations

import json
import zlib
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from ldct_tf import ct, records
from ldct_tf.errors import LdctError

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".tfrecord.gz"
#: Slices whose size is read to check that a patch fits inside them (only height and width are parsed).
_SIZE_SAMPLE = 64


class DataError(LdctError, ValueError):
    """The pipeline's output folder cannot be read as asked (a broken shard, an empty split, a patch larger than the
    slices); the message names the folder or the shard."""


# Shards already checked in this process, by (path, size, mtime): a retrained or tuned model reads them many times.
_VERIFIED: set = set()


def _check_gzip_stream(path: str) -> Optional[str]:
    """What is wrong with the gzip file ``path`` (None when it is one or more complete gzip members)."""
    decompressor = zlib.decompressobj(wbits=31)
    seen = False
    with tf.io.gfile.GFile(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            seen = True
            while chunk:
                try:
                    decompressor.decompress(chunk)
                except zlib.error as exc:
                    return f"not a valid gzip file ({exc})"
                chunk = decompressor.unused_data if decompressor.eof else b""
                if decompressor.eof and chunk:
                    decompressor = zlib.decompressobj(wbits=31)  # a second gzip member follows
    if not seen:
        return "empty file (zero bytes)"
    if not decompressor.eof:
        return "truncated (the gzip stream ends early: an interrupted write or copy)"
    return None


def check_shards(files: Sequence[str]) -> None:
    """Raise :class:`DataError` naming the first zero-byte, truncated or corrupt shard of ``files``.

    Why up front: TensorFlow reports such a shard as a ``DataLossError`` traceback deep inside ``fit``, possibly hours
    into training and without saying which file; one pass over the compressed bytes here names it at once.
    """
    for path in files:
        stat = tf.io.gfile.stat(path)
        key = (path, stat.length, stat.mtime_nsec)
        if key in _VERIFIED:
            continue
        problem = _check_gzip_stream(path)
        if problem:
            raise DataError(f"{path}: unreadable shard: {problem}; re-run the pipeline or copy its output again")
        _VERIFIED.add(key)


def check_patch_fits(files: Sequence[str], patch_size: int, what: str) -> None:
    """Raise :class:`DataError` when ``patch_size`` is larger than every sampled slice of ``files``.

    Why: a larger patch is padded with air, so no crop ever reaches the tissue fraction and the patch stream's filter
    waits forever (issue 27: ``data.patch_size=1024`` on 512x512 slices hung).  The first slices of the shards are
    enough: a folder's slices come from the same kind of scanner.
    """
    spec = {"height": tf.io.FixedLenFeature([], tf.int64), "width": tf.io.FixedLenFeature([], tf.int64)}
    sides = (tf.data.TFRecordDataset(list(files), compression_type="GZIP").take(_SIZE_SAMPLE)
             .map(lambda x: tf.io.parse_single_example(x, spec)))
    largest = max((min(int(s["height"]), int(s["width"])) for s in sides.as_numpy_iterator()), default=0)
    if largest and patch_size > largest:  # no slice sampled: nothing to judge (an empty stream fails on its own)
        raise DataError(f"data.patch_size {patch_size} is larger than the {what} slices (their shorter side is at "
                        f"most {largest} pixels); choose a patch size of at most {largest}")


def read_manifest(data_dir: str) -> dict:
    """The pipeline's ``manifest.json``; a missing one or another schema version raises with the folder named."""
    path = f"{data_dir.rstrip('/')}/{MANIFEST}"
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; is this the output folder of python -m ldct_tf.pipeline?")
    with tf.io.gfile.GFile(path, "r") as handle:
        manifest = json.load(handle)
    version = manifest.get("schema_version")
    if version != records.SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {version}, this ldct_tf reads {records.SCHEMA_VERSION}; "
                         "re-run the pipeline with this version")
    return manifest


def shard_files(data_dir: str, split: str, dose: Optional[str] = None) -> list[str]:
    """Shard paths of one split (all doses, or one), sorted."""
    if split not in records.SPLITS:
        raise ValueError(f"split must be one of {records.SPLITS}, got {split!r}")
    doses: Sequence[str] = records.DOSES if dose is None else (dose,)
    if dose is not None and dose not in records.DOSES:
        raise ValueError(f"dose must be one of {records.DOSES}, got {dose!r}")
    files: list[str] = []
    for d in doses:
        files.extend(tf.io.gfile.glob(f"{data_dir.rstrip('/')}/{split}/{d}-*{SHARD_SUFFIX}"))
    return sorted(files)


def slice_count(manifest: dict, split: str, dose: Optional[str] = None) -> int:
    counts = manifest["counts"].get(split, {})
    return int(sum(counts.values()) if dose is None else counts.get(dose, 0))


def slice_dataset(
    data_dir: str,
    split: str,
    dose: Optional[str] = None,
    shuffle_files: bool = False,
    seed: Optional[int] = None,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Dataset of ``(hu float32 [H, W, 1], metadata dict)`` for one split and dose (or both doses).

    Raises ``ValueError`` naming the folder when the manifest says the split/dose holds no slices, so that training
    on an empty stream fails at once instead of hanging on ``repeat()``.  ``input_context``: this worker's share only
    (:func:`worker_records`).
    """
    manifest = read_manifest(data_dir)
    files = shard_files(data_dir, split, dose)
    what = f"{dose}-dose " if dose else ""
    if slice_count(manifest, split, dose) == 0:
        raise DataError(f"{data_dir}: split {split!r} has no {what}slices (manifest counts: {manifest['counts']})")
    if not files:
        raise DataError(f"{data_dir}: the manifest lists {slice_count(manifest, split, dose)} {what}slices in split "
                         f"{split!r} but there are no shard files ({split}/{dose or '*'}-*{SHARD_SUFFIX}); copy the "
                         "pipeline's output folder whole")
    check_shards(files)
    dataset = worker_records(files, input_context, shuffle_files, seed)
    return dataset.map(records.parse, num_parallel_calls=tf.data.AUTOTUNE)


def worker_records(files: Sequence[str], input_context: Optional[tf.distribute.InputContext] = None,
                   shuffle_files: bool = False, seed: Optional[int] = None) -> tf.data.Dataset:
    """The serialized records of ``files`` that this worker reads (all of them without ``input_context``).

    FILE sharding when every input pipeline (worker) gets at least one whole file: each reads only its files.  With
    fewer files than workers, DATA sharding: every worker reads every file and keeps every n-th record (correct but
    n times the reading).  Write at least as many shards per stream as workers (the pipeline's --num-shards).
    """
    workers = input_context.num_input_pipelines if input_context else 1
    index = input_context.input_pipeline_id if input_context else 0
    by_file = workers > 1 and len(files) >= workers
    file_ds = tf.data.Dataset.from_tensor_slices(list(files))
    if by_file:
        file_ds = file_ds.shard(workers, index)
    if shuffle_files:
        file_ds = file_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = file_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle_files,
    )
    return dataset.shard(workers, index) if workers > 1 and not by_file else dataset


def _distribute_options(input_context: Optional[tf.distribute.InputContext]) -> tf.data.Options:
    """Sharded by :func:`worker_records` when built per worker (auto-sharding off); else tf.distribute's DATA
    auto-sharding of a global dataset (``experimental_distribute_dataset``)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (tf.data.experimental.AutoShardPolicy.OFF if input_context
                                                         else tf.data.experimental.AutoShardPolicy.DATA)
    return options


# --- training input -----------------------------------------------------------------------------------------------

#: A pixel counts as tissue (not air) above this HU; patches mostly of air teach a denoiser nothing.
TISSUE_HU = -900.0
_CANDIDATES_PER_SLICE = 8


def _pad_at_least(hu: tf.Tensor, size: int) -> tf.Tensor:
    """Pad a [H, W, 1] HU slice with air so both sides are at least ``size``."""
    shape = tf.shape(hu)
    pad_h, pad_w = tf.maximum(size - shape[0], 0), tf.maximum(size - shape[1], 0)
    return tf.pad(hu, [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]],
                  constant_values=ct.AIR_HU)


def _candidate_patches(hu: tf.Tensor, patch_size: int) -> tf.Tensor:
    hu = _pad_at_least(hu, patch_size)
    return tf.stack([tf.image.random_crop(hu, [patch_size, patch_size, 1]) for _ in range(_CANDIDATES_PER_SLICE)])


def _augment(patch: tf.Tensor) -> tf.Tensor:
    """Random flips and 90-degree rotations: the 8 symmetries of the square, all plausible for CT noise."""
    patch = tf.image.random_flip_left_right(patch)
    patch = tf.image.random_flip_up_down(patch)
    return tf.image.rot90(patch, k=tf.random.uniform([], 0, 4, dtype=tf.int32))


def stream_kernels(data_dir: str, split: str, dose: str) -> set[str]:
    """The reconstruction kernels of one split and dose's slices (only the kernel feature is parsed, not the pixels)."""
    files = shard_files(data_dir, split, dose)
    check_shards(files)
    spec = {"kernel": tf.io.FixedLenFeature([], tf.string)}
    found = tf.data.TFRecordDataset(files, compression_type="GZIP").map(
        lambda x: tf.io.parse_single_example(x, spec)["kernel"])
    return {k.decode() for k in found.as_numpy_iterator()}


def matched_kernels(data_dir: str, split: str = "train") -> list[str]:
    """Kernels that both the low- and the normal-dose stream of ``split`` hold.

    Why: an unpaired critic that compares denoised low-dose slices of one kernel with normal-dose slices of another
    learns the kernel's texture, and the adversarial term then pushes the denoiser to translate kernels (a smooth
    B30f slice made to look D45f-sharp) rather than to remove noise.  ``data.kernel_matched`` keeps only these.
    Raises ``ValueError`` naming the folder when the two streams share no kernel.
    """
    low, normal = stream_kernels(data_dir, split, "low"), stream_kernels(data_dir, split, "normal")
    shared = sorted(low & normal)
    if not shared:
        raise DataError(f"{data_dir}: data.kernel_matched: the {split} low-dose kernels {sorted(low)} and normal-dose "
                         f"kernels {sorted(normal)} have none in common")
    return shared


def patch_stream(data_dir: str, dose: str, patch_size: int, batch_size: int, min_tissue_fraction: float = 0.5,
                 augment: bool = True, shuffle_buffer: int = 256, cache: bool = True,
                 seed: Optional[int] = None, split: str = "train",
                 kernels: Optional[Sequence[str]] = None,
                 input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
    """Endless batches ``[batch, patch, patch, 1]`` (model scale) of random patches of one dose.

    Each slice offers a few random crops; crops with less than ``min_tissue_fraction`` of tissue pixels are dropped.
    ``cache`` keeps the decoded slices in memory after the first pass (about 1 MB per 512x512 slice).  ``kernels``
    keeps only slices reconstructed with those kernels (None = all).  ``input_context``: this worker's shards, and
    ``batch_size`` is then one replica's batch.
    """
    slices = slice_dataset(data_dir, split, dose, shuffle_files=True, seed=seed, input_context=input_context)
    check_patch_fits(shard_files(data_dir, split, dose), patch_size, f"{data_dir} {split} {dose}-dose")
    if kernels is not None:
        wanted = tf.constant(list(kernels))
        slices = slices.filter(lambda hu, meta: tf.reduce_any(tf.equal(meta["kernel"], wanted)))
    slices = slices.map(lambda hu, meta: hu)
    if cache:
        slices = slices.cache()
    options = _distribute_options(input_context)
    patches = (
        slices.shuffle(shuffle_buffer, seed=seed).repeat()
        .map(lambda hu: _candidate_patches(hu, patch_size), num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        .filter(lambda p: tf.reduce_mean(tf.cast(p > TISSUE_HU, tf.float32)) >= min_tissue_fraction)
    )
    if augment:
        patches = patches.map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
    return (patches.map(ct.to_model, num_parallel_calls=tf.data.AUTOTUNE)
            .shuffle(shuffle_buffer, seed=seed)
            .batch(batch_size, drop_remainder=True)
            .with_options(options))


def unpaired_training_dataset(data_dir: str, patch_size: int, batch_size: int, seed: Optional[int] = None,
                              kernel_matched: bool = False, **kwargs) -> tf.data.Dataset:
    """``(low, normal)`` batches from two independent streams: never the same patient or position by design.
    ``kernel_matched``: both streams keep only the kernels they share (:func:`matched_kernels`)."""
    kernels = matched_kernels(data_dir) if kernel_matched else None
    low = patch_stream(data_dir, "low", patch_size, batch_size, seed=seed, kernels=kernels, **kwargs)
    normal = patch_stream(data_dir, "normal", patch_size, batch_size, seed=None if seed is None else seed + 1,
                          kernels=kernels, **kwargs)
    return tf.data.Dataset.zip((low, normal)).prefetch(tf.data.AUTOTUNE)


def simulated_pair_count(manifest: dict, split: str = "train") -> int:
    """Simulated pairs that ``ldct_tf.pipeline.simulate_pairs`` wrote for ``split`` (0 when it has not run)."""
    return int(manifest.get("simulated", {}).get(split, {}).get("pairs", 0))


def noisier2noise_target(pair: tf.Tensor, i0: tf.Tensor, dose_fraction: tf.Tensor,
                         normal_i0: float) -> tf.Tensor:
    """``[low, reference]`` HU -> ``[low, target]``: the Noisier2Noise target (Moran et al., CVPR 2020) of a pair
    whose reference is a real normal-dose slice (``simulate_pairs --reference original``).

    Why: that reference keeps the scanner's resolution but also its own noise ``n``; a denoiser trained on it learns
    to keep ``n`` (about 27 HU left on L286).  The low image is ``reference + m`` with inserted noise ``m`` of the same
    texture and ``ratio`` times ``n``'s variance, so ``E[x | low] = E[target | low]`` for
    ``target = reference - (low - reference) / ratio``: an MSE-type loss on it learns the noise-free slice at full
    resolution without ever seeing one.  Under the ``insert`` model, in the quantum limit, the inserted variance is
    ``(1 - k) / (k i0)`` and the slice's own is ``1 / normal_i0``: ``ratio = (1 - k) normal_i0 / (k i0)`` per
    realisation (the stream samples i0 across the calibrated range).
    """
    ratio = (1.0 - dose_fraction) * normal_i0 / (dose_fraction * i0)
    low, reference = pair[..., :1], pair[..., 1:]
    return tf.concat([low, reference - (low - reference) / ratio], axis=-1)


def simulated_pair_stream(data_dir: str, patch_size: int, batch_size: int, min_tissue_fraction: float = 0.5,
                          augment: bool = True, shuffle_buffer: int = 256, cache: bool = True,
                          seed: Optional[int] = None, split: str = "train",
                          noisier2noise_i0: float = 0.0,
                          input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
    """Endless batches ``(simulated_low, reference)`` ``[batch, patch, patch, 1]`` (model scale): the same random
    crop, flip and rotation of a simulated low-dose realisation and its noiseless reference (they are cropped as
    one two-channel image, so they stay aligned); tissue is judged on the target.  ``noisier2noise_i0`` > 0 replaces
    the reference by :func:`noisier2noise_target` (once per record, before the cache).  Without ``cache`` the pairs
    stream from the shards on every pass (memory bounded by the shuffle buffers); ``input_context`` as in
    :func:`patch_stream`."""
    files = sorted(tf.io.gfile.glob(f"{data_dir.rstrip('/')}/{split}/simulated-*{SHARD_SUFFIX}"))
    if not files:
        raise DataError(f"{data_dir}: split {split!r} has no simulated pairs; run python -m ldct_tf.simulate pairs")
    check_shards(files)
    check_patch_fits(files, patch_size, f"{data_dir} {split} simulated")

    def parse(serialized):
        pair, meta = records.parse_simulated(serialized)
        if noisier2noise_i0 > 0:
            return noisier2noise_target(pair, meta["i0"], meta["dose_fraction"], noisier2noise_i0)
        return pair

    pairs = worker_records(files, input_context, shuffle_files=True, seed=seed).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        pairs = pairs.cache()

    def candidates(pair):
        pair = tf.concat([_pad_at_least(pair[..., :1], patch_size), _pad_at_least(pair[..., 1:], patch_size)], -1)
        return tf.stack([tf.image.random_crop(pair, [patch_size, patch_size, 2]) for _ in range(_CANDIDATES_PER_SLICE)])

    patches = (pairs.shuffle(shuffle_buffer, seed=seed).repeat()
               .map(candidates, num_parallel_calls=tf.data.AUTOTUNE)
               .unbatch()
               .filter(lambda p: tf.reduce_mean(tf.cast(p[..., 1] > TISSUE_HU, tf.float32)) >= min_tissue_fraction))
    if augment:
        patches = patches.map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
    options = _distribute_options(input_context)
    return (patches.map(lambda p: (ct.to_model(p[..., :1]), ct.to_model(p[..., 1:])),
                        num_parallel_calls=tf.data.AUTOTUNE)
            .shuffle(shuffle_buffer, seed=seed)
            .batch(batch_size, drop_remainder=True)
            .with_options(options))


def training_dataset(data_dir: str, cfg, seed: Optional[int] = None,
                     input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
    """The training input of a config: ``(low, normal)`` unpaired batches, plus ``(simulated_low, reference)`` when
    ``loss.simulated`` > 0 (batch ``train.simulated_batch_size``, default the same; cached only with
    ``data.cache_simulated``).  With ``input_context`` (``strategy.distribute_datasets_from_function``) this worker's
    share in one replica's batches; the batches must divide by the replicas (``ldct_tf.train.check_batches``)."""
    d, t = cfg.data, cfg.train

    def batch(global_batch: int) -> int:
        return input_context.get_per_replica_batch_size(global_batch) if input_context else global_batch

    common = dict(min_tissue_fraction=d.min_tissue_fraction, augment=d.augment, shuffle_buffer=d.shuffle_buffer,
                  input_context=input_context)
    unpaired = unpaired_training_dataset(data_dir, d.patch_size, batch(t.batch_size), seed=seed,
                                         kernel_matched=d.kernel_matched, cache=d.cache, **common)
    if cfg.loss.simulated <= 0:
        return unpaired
    simulated = simulated_pair_stream(data_dir, d.patch_size, batch(t.simulated_batch_size or t.batch_size),
                                      seed=None if seed is None else seed + 2, cache=d.cache_simulated,
                                      noisier2noise_i0=cfg.loss.noisier2noise_i0, **common)
    return (tf.data.Dataset.zip((unpaired, simulated))
            .map(lambda real, sim: (real[0], real[1], sim[0], sim[1]))
            .prefetch(tf.data.AUTOTUNE))


def validation_examples(data_dir: str, max_slices: int, split: str = "val") -> tuple[list, bool]:
    """Whole validation slices as ``[(low_hu, normal_hu)]`` numpy pairs, and whether they are true pairs.

    Pairs are matched by patient pseudonym and slice position (z within 0.01 mm), as the Mayo data allows.  Without any
    match, low and normal slices are zipped unpaired (only the loss terms are then meaningful).  Returns ``([], False)``
    when the split lacks a dose.
    """
    manifest = read_manifest(data_dir)
    if slice_count(manifest, split, "low") == 0 or slice_count(manifest, split, "normal") == 0:
        return [], False
    def load(dose):
        return [(hu.numpy(), meta["patient"].numpy().decode(), round(float(meta["z_mm"]), 2))
                for hu, meta in slice_dataset(data_dir, split, dose)]
    lows, normals = load("low"), load("normal")
    normal_at = {(patient, z): hu for hu, patient, z in normals}
    pairs = [(hu, normal_at[(patient, z)]) for hu, patient, z in lows if (patient, z) in normal_at]
    paired = bool(pairs)
    if not paired:
        pairs = [(low[0], normal[0]) for low, normal in zip(lows, normals)]
    return pairs[:max_slices], paired


def validation_dataset(pairs: list, paired: bool, multiple: int, batch_size: int) -> Optional[tf.data.Dataset]:
    """Batches ``(low, normal, paired)`` of whole slices on the model scale, padded with air to a common size that
    is a multiple of ``multiple``.  ``batch_size`` should be the replica count so every replica gets a slice."""
    if not pairs:
        return None
    height = max(max(l.shape[0], n.shape[0]) for l, n in pairs)
    width = max(max(l.shape[1], n.shape[1]) for l, n in pairs)
    height, width = ct.padded_size(height, multiple), ct.padded_size(width, multiple)

    def pad(hu):
        out = np.full((height, width, 1), ct.AIR_HU, np.float32)
        out[: hu.shape[0], : hu.shape[1]] = hu
        return ct.to_model(out)

    while len(pairs) % batch_size:
        pairs = pairs + pairs[: batch_size - len(pairs) % batch_size]
    low = np.stack([pad(l) for l, _ in pairs])
    normal = np.stack([pad(n) for _, n in pairs])
    flags = np.full((len(pairs),), 1.0 if paired else 0.0, np.float32)
    return tf.data.Dataset.from_tensor_slices((low, normal, flags)).batch(batch_size)
