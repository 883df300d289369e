"""benchmarks/hippo_reconstruction.py: the HiPPO function-approximation table's own property,
that LegS (the whole history from the final state) reconstructs band-limited noise better as the
state grows, and reconstructs it nearly exactly once the state resolves the band; the signals
are what the script says (band-limited, unit RMS)."""
import numpy as np

from benchmarks import hippo_reconstruction as hr


def test_band_limited_noise_is_band_limited_and_unit_rms():
    f = hr.band_limited_noise(0, 256, cutoff=5)
    spectrum = np.abs(np.fft.rfft(f))
    assert np.max(spectrum[6:]) < 1e-9 * np.max(spectrum)
    np.testing.assert_allclose(np.mean(f ** 2), 1.0, rtol=1e-12)


def test_legs_error_falls_with_state_size():
    signals = np.stack([hr.band_limited_noise(s, 512, cutoff=4) for s in range(2)])
    errors = [hr.reconstruction_error("legs", n, signals, window=128, lag_scale=32.0)
              for n in (4, 8, 16, 32)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-2, errors
