"""ldct_tf.evaluate.lesions, ldct_tf.evaluate.detectability and the audit/detectability sections of evaluate's report."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ldct_tf import evaluate
from ldct_tf.evaluate import detectability
from ldct_tf.evaluate import lesions

SPACING = 0.7


def body(size: int = 256) -> np.ndarray:
    rr, cc = np.mgrid[0:size, 0:size]
    hu = np.full((size, size), -1000.0, np.float32)
    hu[np.hypot(rr - size / 2, cc - size / 2) < size * 0.45] = 60.0
    return hu


def synthetic_case(seed: int = 0) -> tuple[np.ndarray, lesions.LesionCase]:
    """Two lesions in a water-like body, correlated noise of about 20 HU, no projector (fast, exact signal)."""
    normal = body()
    found = [lesions.Lesion(100.0, 110.0, 12.0, -30.0), lesions.Lesion(160.0, 150.0, 8.0, 25.0)]
    signal = lesions.disc_image(normal.shape, found, SPACING)
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(normal.shape), 0.8) * 50.0
    ref_with, ref_without = normal + signal, normal.copy()
    return normal, lesions.LesionCase("synthetic", found, SPACING, (ref_with + noise).astype(np.float32),
                                      (ref_without + noise).astype(np.float32), ref_with, ref_without)


def test_place_lesions_respects_ranges_and_never_overlaps():
    normal = body()
    found = lesions.place_lesions(normal, SPACING, 4, np.random.default_rng(3))
    assert 2 <= len(found) <= 4
    assert {np.sign(l.contrast_hu) for l in found} == {-1.0, 1.0}  # hypo- and hyperdense
    for i, a in enumerate(found):
        assert 5.0 <= a.diameter_mm <= 15.0 and 10.0 <= abs(a.contrast_hu) <= 40.0
        assert normal[int(a.row), int(a.col)] == 60.0
        for b in found[i + 1:]:
            assert np.hypot(a.row - b.row, a.col - b.col) > a.radius_px(SPACING) + b.radius_px(SPACING)


def test_disc_image_holds_the_contrast_over_the_disc_area():
    lesion = lesions.Lesion(50.0, 50.0, 14.0, -20.0)
    image = lesions.disc_image((100, 100), [lesion], SPACING)
    assert image[50, 50] == pytest.approx(-20.0)
    area = np.pi * lesion.radius_px(SPACING) ** 2
    assert image.sum() / -20.0 == pytest.approx(area, rel=0.03)


def test_identity_keeps_the_contrast_and_an_eraser_loses_it():
    normal, case = synthetic_case()
    background = detectability.background_positions(normal, case.lesions, SPACING)
    assert len(background) >= 20
    ident = detectability.score_case(case, case.low_with, case.low_without, background)
    assert [r["contrast_kept"] for r in ident] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert all(r["dprime"] > 3 for r in ident)
    erase = detectability.score_case(case, case.low_without, case.low_without, background)  # lesions gone
    assert all(abs(r["dprime"]) < 1e-6 for r in erase)
    blur = lambda hu: ndimage.gaussian_filter(hu, 6.0)  # noqa: E731  (wins on noise, smears small lesions)
    blurred = detectability.score_case(case, blur(case.low_with), blur(case.low_without), background)
    assert blurred[1]["contrast_kept"] < 0.5
    summary = detectability.summarise({"input": ident, "erase": erase})
    assert summary["input"]["dprime_vs_input"] == pytest.approx(1.0)
    assert summary["erase"]["dprime_vs_input"] == pytest.approx(0.0, abs=1e-6)
    assert summary["erase"]["detectable_share"] == 0.0


def test_median_eraser_and_painter_are_what_they_claim():
    normal, case = synthetic_case()
    out = lesions.median_eraser(11)(case.low_with)
    small = case.lesions[1]
    r, c = int(small.row), int(small.col)
    assert abs(out[r, c] - 60.0) < abs(case.ref_with[r, c] - 60.0)  # the 8 mm lesion is mostly gone
    painter = lesions.DiscPainter(SPACING, n=1, seed=0, base=lambda hu: hu)
    painter.avoid = case.lesions
    painted_image = painter(case.low_with)
    (disc,) = painter.painted
    assert painted_image[int(disc.row), int(disc.col)] - case.low_with[int(disc.row), int(disc.col)] == \
        pytest.approx(disc.contrast_hu, abs=1e-3)
    assert all(np.hypot(disc.row - l.row, disc.col - l.col) > 10 for l in case.lesions)


@pytest.mark.slow
def test_evaluate_report_has_audit_and_detectability_tables(tmp_path):
    """Through evaluate(): two simulated pairs, lesions inserted in the first; ~30 s (four simulations)."""
    from ldct_tf import simulate

    normal = body()
    pairs = []
    for i in range(2):
        low, ref = simulate.simulate_low_dose(normal, 0.25, i0=5e5, seed=i, pixel_spacing_mm=SPACING)
        pairs.append(evaluate.Pair(f"phantom{i}", low, ref, (SPACING, SPACING)))
    denoisers = {"none": lambda hu: np.asarray(hu, np.float32), "gaussian": lambda hu: ndimage.gaussian_filter(hu, 3.0)}
    summary = evaluate.evaluate(pairs, denoisers, tmp_path, progress=False, lesions=1)
    assert set(summary["audit"]) == {"none", "gaussian"}
    assert summary["audit"]["none"]["flagged_patches_per_slice"] == 0.0
    det = summary["detectability"]["per_denoiser"]
    assert det["none"]["dprime_vs_input"] == pytest.approx(1.0)
    assert det["gaussian"]["contrast_kept_mean"] < det["none"]["contrast_kept_mean"]
    report = (tmp_path / "report.md").read_text()
    assert "## Change audit" in report and "## Low-contrast detectability" in report
    assert (tmp_path / "figures" / "audit_flags.png").exists() and (tmp_path / "figures" / "detectability.png").exists()
