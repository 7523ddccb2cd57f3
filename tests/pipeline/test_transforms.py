"""Each PTransform alone, with Beam's testing utilities."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from ldct_tf import dicom, records
from ldct_tf.demo import sample_data
from ldct_tf.pipeline import transforms
from ldct_tf.pipeline.dose import DoseClassifier, DoseRules


@pytest.fixture(scope="module")
def one_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    hu = np.rint(sample_data.ct_small_hu())
    ident = sample_data.Identity("MRN42", "Roe^Richard")
    files = sample_data.write_series(folder / "s", [hu, hu + 1], ident, exposure_mas=40.0, ctdivol=2.5)
    (folder / "s" / "junk.bin").write_bytes(b"\x00" * 300)
    return folder, files, hu


def _slice(path):
    hu, info = dicom.read_slice(path)
    return transforms.Slice(hu=hu.astype(np.int16), info=info)


def test_read_dicom_slices(one_series):
    folder, files, hu = one_series
    with BeamTestPipeline() as p:
        out = p | beam.Create([f"{folder}/**"]) | transforms.ReadDicomSlices()
        assert_that(out.slices | "Sum" >> beam.Map(lambda s: (s.info.instance, int(s.hu.astype(np.int64).sum()))),
                    equal_to([(1, int(hu.sum())), (2, int((hu + 1).sum()))]), label="slices")
        assert_that(out[transforms.REJECTED] | beam.Map(lambda r: (r["path"].endswith("junk.bin"), r["reason"])),
                    equal_to([(True, dicom.NOT_DICOM)]), label="rejected")


def test_classify_dose(one_series):
    _, files, _ = one_series
    items = [_slice(f) for f in files]
    rules_low = DoseClassifier(None, DoseRules(low_max_ctdivol=3.0))
    rules_none = DoseClassifier(None, DoseRules(low_max_ctdivol=1.0))
    with BeamTestPipeline() as p:
        low = p | "A" >> beam.Create(items) | "CA" >> transforms.ClassifyDose(rules_low)
        unknown = p | "B" >> beam.Create(items) | "CB" >> transforms.ClassifyDose(rules_none)
        assert_that(low.slices | "DA" >> beam.Map(lambda s: s.dose), equal_to(["low", "low"]), label="low")
        assert_that(low[transforms.REJECTED] | "RA" >> beam.Map(lambda r: r), equal_to([]), label="none_rejected")
        assert_that(unknown[transforms.REJECTED] | "RB" >> beam.Map(lambda r: r["reason"]),
                    equal_to([transforms.DOSE_UNKNOWN] * 2), label="unknown")


def test_assign_split_is_by_patient_and_pseudonymous(one_series):
    _, files, _ = one_series
    items = [dataclasses.replace(_slice(f), dose="low") for f in files]
    fractions = transforms.parse_splits("train=0.5,val=0.5")
    with BeamTestPipeline() as p:
        out = p | beam.Create(items) | transforms.AssignSplit("salt", fractions)
        expected_patient = records.pseudonym("MRN42", "salt", "patient")
        expected_split = transforms.split_for(expected_patient, fractions)
        assert_that(out.slices | beam.Map(lambda s: (s.patient, s.split)),
                    equal_to([(expected_patient, expected_split)] * 2))


def test_manifest_patient_column_replaces_patient_id(one_series):
    _, files, _ = one_series
    item = dataclasses.replace(_slice(files[0]), dose="low", patient_key="L096")
    out = list(transforms.AssignSplitFn("salt", {"train": 1.0}).process(item))
    assert out[0].patient == records.pseudonym("manifest:L096", "salt", "patient")


def test_manifest_split_column_overrides_the_derived_split(one_series):
    _, files, _ = one_series
    item = dataclasses.replace(_slice(files[0]), dose="low", patient_key="L286", fixed_split="test")
    out = list(transforms.AssignSplitFn("salt", {"train": 1.0}).process(item))
    assert out[0].split == "test"  # although the fractions put every derived split in train


def test_split_fractions_are_respected_over_many_patients():
    fractions = transforms.parse_splits("train=0.8,val=0.1,test=0.1")
    splits = [transforms.split_for(records.pseudonym(f"P{i}", "s", "patient"), fractions) for i in range(4000)]
    shares = {name: splits.count(name) / len(splits) for name in records.SPLITS}
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["val"] - 0.1) < 0.02 and abs(shares["test"] - 0.1) < 0.02
    only_train = transforms.parse_splits("train=1")
    assert {transforms.split_for(records.pseudonym(f"P{i}", "s", "patient"), only_train) for i in range(50)} == {
        "train"}


@pytest.mark.parametrize("text, match", [("train=0.8,val=0.1", "sum to 1"), ("train=0.5,holdout=0.5", "NAME"),
                                         ("train=x", "fraction"), ("train=1.5,val=-0.5", r"\[0, 1\]")])
def test_parse_splits_errors(text, match):
    with pytest.raises(ValueError, match=match):
        transforms.parse_splits(text)


def test_hu_stats_combine_exactly():
    rng = np.random.default_rng(1)
    images = [rng.integers(-1024, 2000, size=(9, 7)).astype(np.int16) for _ in range(5)]
    fn = transforms.HUStatsFn()
    acc = fn.create_accumulator()
    for image in images[:3]:
        acc = fn.add_input(acc, transforms.slice_stats(image))
    other = fn.add_input(fn.create_accumulator(), transforms.slice_stats(images[3]))
    other = fn.add_input(other, transforms.slice_stats(images[4]))
    out = fn.extract_output(fn.merge_accumulators([acc, other]))
    everything = np.concatenate([i.ravel() for i in images]).astype(np.float64)
    assert out["pixels"] == everything.size
    assert out["mean"] == pytest.approx(everything.mean(), abs=1e-3)
    assert out["std"] == pytest.approx(everything.std(), abs=1e-3)
    assert (out["min"], out["max"]) == (everything.min(), everything.max())
    assert abs(out["p50"] - np.percentile(everything, 50)) <= transforms.HIST_BIN


def test_summarise_nests_counts_and_reasons():
    enc = [transforms.EncodedSlice("train", "low", "p1", "s1", b"", transforms.slice_stats(np.zeros((2, 2), np.int16))),
           transforms.EncodedSlice("train", "low", "p1", "s1", b"", transforms.slice_stats(np.ones((2, 2), np.int16))),
           transforms.EncodedSlice("test", "normal", "p2", "s2", b"", transforms.slice_stats(np.ones((2, 2), np.int16)))]
    rej = [{"path": "x", "reason": "not_dicom", "detail": ""}, {"path": "y", "reason": "not_dicom", "detail": ""}]
    with BeamTestPipeline() as p:
        summary = (p | "E" >> beam.Create(enc), p | "R" >> beam.Create(rej)) | transforms.Summarise()

        def check(items):
            (s,) = items
            assert s["counts"]["train"] == {"low": 2, "normal": 0}
            assert s["counts"]["test"] == {"low": 0, "normal": 1}
            assert s["patients"]["train"]["low"] == 1 and s["series"]["test"]["normal"] == 1
            assert s["rejected"] == 2 and s["rejected_by_reason"] == {"not_dicom": 2}
            assert s["hu_stats"]["low"]["pixels"] == 8 and s["hu_stats"]["low"]["mean"] == 0.5

        assert_that(summary, check)
