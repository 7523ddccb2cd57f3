"""Low-dose simulation from a normal-dose CT slice in the projection domain (Yu et al. 2012; Zeng et al. 2015).

HU -> linear attenuation mu -> parallel-beam forward projection (scikit-image ``radon``) -> line integrals p ->
quantum (photon) noise at ``dose_fraction * i0`` counts plus Gaussian electronic noise -> log -> filtered back
projection (``iradon``).  The reference is the same slice through the same projector and FBP without noise, so a
``(low_hu, reference_hu)`` pair differs only by noise - what a paired metric needs.

Two noise models:

``"insert"`` (default; Zeng et al. 2015, the way Mayo made the real quarter-dose data)
    The input is a real normal-dose slice that already carries the noise of ``i0`` counts per ray.  Only the
    difference is added: Gaussian noise in the line integrals with variance
    ``(1 - k) / (k I) + sigma_e^2 (1 - k^2) / (k^2 I^2)``, ``I = i0 exp(-p)``, the variance of a ``k i0`` measurement
    minus that of an ``i0`` one.  The result has about the noise of a real ``k``-dose scan.
``"poisson"`` (Yu et al. 2012 on an idealised input)
    The input is treated as noise-free: counts ~ Poisson(``k i0 exp(-p)``) + N(0, sigma_e^2), then
    ``p = -log(counts / (k i0))``.  Use it on phantoms or already denoised slices; on a real normal-dose slice it
    over-states the noise slightly because the input's own noise stays in.
``"gaussian"`` (the whole noise of a ``k i0`` scan, Gaussian approximation)
    Line-integral noise of variance ``1 / (k I) + sigma_e^2 / (k I)^2``, with no photon starvation: what a real scan
    of this body would carry in total.  The calibration predicts a slice's own noise with it; its variance scales
    exactly with ``1 / i0``.

Limits worth knowing: parallel beam rather than the scanner's fan beam, no bowtie filter (every ray starts with
``i0``), a single effective energy (``mu_water``), and skimage's FBP filter instead of the vendor kernel, so the noise
texture follows ``filter_name`` rather than the scanner's kernel.  ``i0`` ~ 1e5 is the usual nominal full-dose
figure; :func:`compare_with_real` measures the noise SD ratio and NPS against a real low-dose slice, and because
added variance scales with ``1 / i0``, ``i0 * ratio**2`` is the i0 that matches that scanner.

Measured on real AAPM-Mayo pairs of the development patients only (simulated quarter dose of the full-dose slice vs
the real quarter dose, added noise in 64 x 64 tiles inside the body; defaults: i0 1e5, ramp filter, 1024 views):

- sharp D45f kernel (L096_D45f_00 to 04): noise SD ratio simulated / real 1.1 to 2.7 (median 2.4), NPS mean
  frequency 0.38 vs 0.41 to 0.43 cycles/mm (about 10 % lower).  The texture matches; the level does not, and patients
  differ: the i0 that matches a site is fitted by :mod:`ldct_tf.simulate.calibration` (for the Mayo scanner
  ``configs/calibration_dev_v3.json``, from L096 and L143 only), never set here.
- smooth B30f kernel (L143_B30f_20 to 22): ratio 5.6 to 7.0 with the ramp filter, NPS mean frequency 0.34 vs 0.27;
  ``filter_name="hann"`` gives ratio 2.1 and 0.20 vs 0.27 (L143_B30f_20).  Pick the FBP filter to resemble the
  kernel whose images you simulate (the calibration picks it by the NPS mean frequency).

The held-out test patient L286 was used for none of these figures.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ldct_tf.errors import LdctError

#: Linear attenuation of water at about 70 keV, the effective energy of a 120 kVp beam (1/mm).
MU_WATER_PER_MM = 0.0192
#: Electronic noise variance in detector counts^2 (Yu et al. 2012 and Zeng et al. 2015 use about 10).
ELECTRONIC_NOISE_VAR = 10.0
NOISE_MODELS = ("insert", "poisson", "gaussian")
#: What the noise is added to.  ``"projected"``: the slice through the projector and FBP (noise-free in the
#: simulator's own geometry, but skimage's radon/iradon round trip blurs it,
#: tests/test_simulate.py).  ``"original"``: the input slice itself, as Mayo's projection-domain noise insertion does - FBP is
#: linear, so the reconstructed noise is added to the image and only the noise passes through the projector.
REFERENCES = ("projected", "original")


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """HU -> linear attenuation in 1/mm; below -1000 HU (air, padding) is clipped to mu = 0."""
    return mu_water * (1.0 + np.maximum(np.asarray(hu, dtype=np.float64), -1000.0) / 1000.0)


def mu_to_hu(mu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    return 1000.0 * (np.asarray(mu, dtype=np.float64) / mu_water - 1.0)


def _inscribed_circle(shape: tuple[int, int]) -> np.ndarray:
    """The reconstruction circle exactly as scikit-image's ``radon(circle=True)`` defines it (centre and radius
    ``n // 2``), so nothing outside it reaches the projector."""
    n = shape[0]
    rr, cc = np.mgrid[0:n, 0:n]
    return (rr - n // 2) ** 2 + (cc - n // 2) ** 2 <= (n // 2) ** 2


class SimulationError(LdctError, ValueError):
    """A simulation or calibration setting or input that cannot be used (a dose fraction outside (0, 1], a slice
    that is not square, a calibration file that does not parse); names the value or file.  A ``ValueError`` too, as
    these checks raised before the project had one error base."""


class ProjectionSimulator:
    """One normal-dose slice, projected once, from which any number of low-dose realisations are made cheaply.

    The forward projection (``radon``, about 2.6 s for 512 x 512 here) is the expensive half and depends only on the
    slice; the FBP is linear, so each realisation costs one FBP of its sinogram noise (about 1.1 s) and the noiseless
    reference is reconstructed once per FBP filter.  Calibration and the simulated-pair stream both need many
    realisations (several i0 values, filters, seeds) of the same slice, which is what this class is for.
    """

    def __init__(self, hu: np.ndarray, pixel_spacing_mm: float = 0.7, n_angles: Optional[int] = None,
                 mu_water: float = MU_WATER_PER_MM):
        hu = np.asarray(hu, dtype=np.float64)
        if hu.ndim != 2 or hu.shape[0] != hu.shape[1]:
            raise SimulationError(f"simulate_low_dose needs a square 2-D HU slice, got shape {hu.shape}")
        if pixel_spacing_mm <= 0:
            raise SimulationError(f"pixel_spacing_mm must be > 0, got {pixel_spacing_mm!r}")
        from skimage.transform import radon

        self.size = hu.shape[0]
        self.hu = hu
        self.pixel_spacing_mm = float(pixel_spacing_mm)
        self.mu_water = mu_water
        self.theta = np.linspace(0.0, 180.0, n_angles or 2 * self.size, endpoint=False)
        self.outside = ~_inscribed_circle(hu.shape)
        mu = hu_to_mu(hu, mu_water) * ~self.outside
        # radon sums pixel values along each ray in pixel steps: times the spacing gives the line integral of mu.
        self.sinogram = radon(mu, theta=self.theta, circle=True) * self.pixel_spacing_mm
        self._references: dict[str, np.ndarray] = {}

    def _fbp_mu(self, sinogram: np.ndarray, filter_name: str) -> np.ndarray:
        from skimage.transform import iradon

        return iradon(sinogram / self.pixel_spacing_mm, theta=self.theta, output_size=self.size,
                      filter_name=filter_name, circle=True)

    def reference(self, filter_name: str = "ramp") -> np.ndarray:
        """The noiseless slice through the projector and this FBP filter (HU, float64, air outside the circle)."""
        if filter_name not in self._references:
            ref = mu_to_hu(self._fbp_mu(self.sinogram, filter_name), self.mu_water)
            ref[self.outside] = -1000.0
            self._references[filter_name] = ref
        return self._references[filter_name]

    def sinogram_noise(self, dose_fraction: float = 0.25, i0: float = 1e5,
                       electronic_noise: float = ELECTRONIC_NOISE_VAR, noise_model: str = "insert",
                       rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """One realisation of the line-integral noise of a ``dose_fraction`` scan (see the module docstring)."""
        if not 0.0 < dose_fraction <= 1.0:
            raise SimulationError(f"dose_fraction must be in (0, 1], got {dose_fraction!r}")
        if i0 <= 0 or electronic_noise < 0:
            raise SimulationError(f"need i0 > 0 and electronic_noise >= 0; got {i0!r}, {electronic_noise!r}")
        if noise_model not in NOISE_MODELS:
            raise SimulationError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")
        rng = rng if rng is not None else np.random.default_rng()
        p, k = self.sinogram, float(dose_fraction)
        if noise_model == "insert":
            counts = i0 * np.exp(-p)
            var = (1.0 - k) / (k * counts) + electronic_noise * (1.0 - k * k) / (k * k * counts * counts)
            return np.sqrt(var) * rng.standard_normal(p.shape)
        if noise_model == "gaussian":
            counts = k * i0 * np.exp(-p)
            return np.sqrt(1.0 / counts + electronic_noise / (counts * counts)) * rng.standard_normal(p.shape)
        expected = k * i0 * np.exp(-p)
        counts = rng.poisson(expected) + rng.normal(0.0, np.sqrt(electronic_noise), p.shape)
        # Rays that receive (almost) no photons would give log(0): floor them at a fraction of a count, the usual fix.
        return -np.log(np.maximum(counts, 0.1) / (k * i0)) - p

    def noise_hu(self, sinogram_noise: np.ndarray, filter_name: str = "ramp") -> np.ndarray:
        """The image-domain noise (HU) of a sinogram noise realisation: FBP is linear, so it is reconstructed alone."""
        noise = self._fbp_mu(sinogram_noise, filter_name) * (1000.0 / self.mu_water)
        noise[self.outside] = 0.0
        return noise

    def pair(self, dose_fraction: float = 0.25, i0: float = 1e5, electronic_noise: float = ELECTRONIC_NOISE_VAR,
             seed: Optional[int] = None, noise_model: str = "insert", filter_name: str = "ramp",
             reference: str = "projected") -> tuple[np.ndarray, np.ndarray]:
        """``(low_hu, reference_hu)`` float32 for one noise realisation; ``reference`` is one of :data:`REFERENCES`.

        A denoiser trained on ``"projected"`` pairs learns to output the round trip's blur; ``"original"`` pairs keep
        the scanner's own resolution in both images (the simulated-pair training stream uses them).
        """
        if reference not in REFERENCES:
            raise SimulationError(f"reference must be one of {REFERENCES}, got {reference!r}")
        rng = np.random.default_rng(seed)
        noise = self.noise_hu(self.sinogram_noise(dose_fraction, i0, electronic_noise, noise_model, rng),
                              filter_name)
        reference = self.reference(filter_name) if reference == "projected" else self.hu
        return (reference + noise).astype(np.float32), reference.astype(np.float32)


def simulate_low_dose(
    hu: np.ndarray,
    dose_fraction: float = 0.25,
    i0: float = 1e5,
    electronic_noise: float = ELECTRONIC_NOISE_VAR,
    seed: Optional[int] = None,
    pixel_spacing_mm: float = 0.7,
    n_angles: Optional[int] = None,
    noise_model: str = "insert",
    filter_name: str = "ramp",
    mu_water: float = MU_WATER_PER_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a ``dose_fraction`` dose scan of a normal-dose slice; returns ``(low_hu, reference_hu)`` float32.

    ``hu`` must be square (the scan field of view is its inscribed circle; outside it both outputs are air).
    ``electronic_noise`` is the electronic noise VARIANCE in counts^2, ``pixel_spacing_mm`` scales the line integrals
    (so the noise level depends on the real body size), ``n_angles`` defaults to ``2 * size`` views over 180 degrees.
    The same ``seed`` gives the same noise.  For several realisations of one slice use :class:`ProjectionSimulator`.
    """
    if not 0.0 < dose_fraction <= 1.0:
        raise SimulationError(f"dose_fraction must be in (0, 1], got {dose_fraction!r}")
    if i0 <= 0 or electronic_noise < 0 or pixel_spacing_mm <= 0:
        raise SimulationError(f"need i0 > 0, electronic_noise >= 0, pixel_spacing_mm > 0; got {i0!r}, "
                         f"{electronic_noise!r}, {pixel_spacing_mm!r}")
    if noise_model not in NOISE_MODELS:
        raise SimulationError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")
    simulator = ProjectionSimulator(hu, pixel_spacing_mm, n_angles, mu_water)
    return simulator.pair(dose_fraction, i0, electronic_noise, seed, noise_model, filter_name)


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0, margin_px: int = 8) -> np.ndarray:
    """Pixels inside the patient: the largest region above ``threshold_hu``, holes filled, eroded by ``margin_px``."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(hu, dtype=np.float64), 2.0) > threshold_hu
    labels, count = ndimage.label(smooth)
    if count == 0:
        return np.zeros(np.shape(hu), bool)
    largest = 1 + int(np.argmax(ndimage.sum(smooth, labels, range(1, count + 1))))
    body = ndimage.binary_fill_holes(labels == largest)
    return ndimage.binary_erosion(body, iterations=margin_px) if margin_px else body


def compare_with_real(normal_hu: np.ndarray, real_low_hu: np.ndarray, dose_fraction: float = 0.25,
                      pixel_spacing_mm: Sequence[float] = (0.7, 0.7), tile: int = 64, seed: int = 0,
                      **simulate_kwargs) -> dict:
    """Validate the simulation on a real pair: simulate ``dose_fraction`` from ``normal_hu`` and compare the ADDED
    noise (simulated low - simulated reference) with the real added noise (real low - normal), on ``tile`` x
    ``tile`` squares inside the body.

    Returns noise SDs, their ratio (simulated / real), the radial NPS mean frequencies and both radial NPS curves.
    """
    from ldct_tf import metrics

    spacing = tuple(float(s) for s in pixel_spacing_mm)
    low, ref = simulate_low_dose(normal_hu, dose_fraction, seed=seed, pixel_spacing_mm=float(np.mean(spacing)),
                                 **simulate_kwargs)
    mask = body_mask(normal_hu)
    sim_tiles = metrics.mask_tiles(low.astype(np.float64) - ref, mask, tile)
    real_tiles = metrics.mask_tiles(np.asarray(real_low_hu, np.float64) - normal_hu, mask, tile)
    if len(sim_tiles) == 0:
        raise SimulationError(f"no {tile}x{tile} tile fits inside the body of this slice")
    f_sim, nps_sim = metrics.nps_radial(sim_tiles, spacing)
    f_real, nps_real = metrics.nps_radial(real_tiles, spacing)
    sd_sim = float(np.sqrt(np.mean([np.var(t) for t in sim_tiles])))
    sd_real = float(np.sqrt(np.mean([np.var(t) for t in real_tiles])))
    return {
        "tiles": len(sim_tiles),
        "noise_sd_sim_hu": sd_sim, "noise_sd_real_hu": sd_real, "sd_ratio": sd_sim / sd_real,
        "nps_mean_freq_sim": metrics.nps_mean_frequency(f_sim, nps_sim),
        "nps_mean_freq_real": metrics.nps_mean_frequency(f_real, nps_real),
        "nps_f": f_sim.tolist(), "nps_sim": nps_sim.tolist(), "nps_real": nps_real.tolist(),
    }
