import math

import pytest

from ldct_tf.pipeline.dose import DoseClassifier, DoseManifest, DoseManifestError, DoseRules


@pytest.fixture
def tree(tmp_path):
    for rel in ["a/low/x.dcm", "a/low/special/y.dcm", "a/normal/z.dcm", "b/w.dcm"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return tmp_path


def _manifest(tree, text):
    path = tree / "doses.csv"
    path.write_text(text)
    return DoseManifest.load(str(path))


def test_longest_folder_wins_and_relative_paths(tree):
    m = _manifest(tree, "path,dose\na,normal\na/low,low\na/low/special,normal\n")
    assert m.lookup(str(tree / "a/low/x.dcm"), "").dose == "low"
    assert m.lookup(str(tree / "a/low/special/y.dcm"), "").dose == "normal"
    assert m.lookup(str(tree / "a/normal/z.dcm"), "").dose == "normal"
    assert m.lookup(str(tree / "b/w.dcm"), "") is None
    assert m.lookup(str(tree / "ab/w.dcm"), "") is None  # a prefix must end at a folder boundary


def test_series_uid_and_exact_file_precedence(tree):
    m = _manifest(tree, f"path,dose,patient\na,normal,\n1.2.840.99.1,low,P7\n{tree}/a/normal/z.dcm,normal,\n")
    assert m.lookup(str(tree / "a/low/x.dcm"), "1.2.840.99.1").dose == "low"  # series beats a folder
    assert m.lookup(str(tree / "a/low/x.dcm"), "1.2.840.99.1").patient == "P7"
    assert m.lookup(str(tree / "a/normal/z.dcm"), "1.2.840.99.1").dose == "normal"  # exact file beats series


@pytest.mark.parametrize("text, match", [
    ("file,dose\na,low\n", "header"),
    ("path,dose\na,quarter\n", "dose must be"),
    ("path,dose\nmissing/folder,low\n", "does not exist"),
    ("path,dose\na,low\na,normal\n", "twice"),
    ("path,dose\n", "no entries"),
    ("path,dose\n,low\n", "empty path"),
])
def test_bad_manifest_names_file_and_problem(tree, text, match):
    with pytest.raises(DoseManifestError, match=match) as info:
        _manifest(tree, text)
    assert "doses.csv" in str(info.value)


def test_rules_description_then_ctdivol_then_mas():
    rules = DoseRules(low_description=r"\bLD\b|low.?dose", normal_description="routine", low_max_ctdivol=5,
                      normal_min_ctdivol=8, low_max_mas=80, normal_min_mas=150)
    assert rules.classify("Abdomen LD 3.0", 20.0, 300) == "low"  # description first
    assert rules.classify("Routine abdomen", 2.0, 30) == "normal"
    assert rules.classify("", 3.0, 300) == "low"
    assert rules.classify("", 12.0, 10) == "normal"
    assert rules.classify("", 6.5, 100) is None  # between thresholds: unknown, not guessed
    assert rules.classify("", math.nan, 60) == "low"  # no CTDIvol: exposure decides
    assert rules.classify("low dose routine", math.nan, math.nan) is None  # both patterns: ambiguous


def test_rules_validate_thresholds_and_patterns():
    with pytest.raises(ValueError, match="below"):
        DoseRules(low_max_ctdivol=10, normal_min_ctdivol=5)
    with pytest.raises(ValueError, match="pattern"):
        DoseRules(low_description="(unclosed")
    assert DoseRules().empty and not DoseRules(low_max_mas=1).empty


@pytest.mark.parametrize("option, value", [("--low-dose-max-ctdivol", "nan"), ("--normal-dose-min-mas", "inf")])
def test_non_finite_dose_rule_is_one_line(tmp_path, capsys, option, value):
    """A NaN threshold matched nothing and was accepted silently (issue 27); now the command refuses it."""
    from ldct_tf.pipeline.__main__ import main

    with pytest.raises(ValueError, match="finite"):
        DoseRules(low_max_ctdivol=math.nan)
    code = main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), option, value])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "Traceback" not in err
    assert f"{option} must be a finite number" in err


def test_classifier_manifest_then_rules(tree):
    m = _manifest(tree, "path,dose\na/low,low\n")
    c = DoseClassifier(m, DoseRules(normal_min_ctdivol=8))
    assert c.classify(str(tree / "a/low/x.dcm"), "", "", 20.0, 0) == ("low", None)
    assert c.classify(str(tree / "b/w.dcm"), "", "", 20.0, 0) == ("normal", None)
    assert c.classify(str(tree / "b/w.dcm"), "", "", 2.0, 0) == (None, None)


def test_manifest_split_column_fixes_the_split(tree):
    m = _manifest(tree, "path,dose,patient,split\na/low,low,P1,test\nb,normal,P2,\n")
    c = DoseClassifier(m)
    assert c.fixed_split(str(tree / "a/low/x.dcm"), "") == "test"
    assert c.fixed_split(str(tree / "b/w.dcm"), "") is None  # empty: derived from the pseudonym as usual
    assert DoseClassifier().fixed_split(str(tree / "b/w.dcm"), "") is None
    with pytest.raises(DoseManifestError, match="split must be one of"):
        _manifest(tree, "path,dose,split\na/low,low,holdout\n")
