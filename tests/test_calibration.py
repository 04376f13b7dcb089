"""kdjax.calibration (temperature scaling) against a brute-force grid search, closed forms and the
optimality condition, all in numpy written here."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from scipy import special

from kdjax import calibration, losses, metrics


def _nll(z, y, t):
  """Mean NLL of softmax(z / t) with integer labels, float64 numpy."""
  log_p = special.log_softmax(np.asarray(z, np.float64) / t, axis=-1)
  return -np.mean(log_p[np.arange(len(y)), y])


def _dnll_dt(z, y, t):
  """d NLL / d T = -(1 / T^2) mean_i (E_{p}[z_i] - z_{i,y_i}),  p = softmax(z_i / T)."""
  z = np.asarray(z, np.float64)
  p = special.softmax(z / t, axis=-1)
  return -np.mean((p * z).sum(-1) - z[np.arange(len(y)), y]) / t**2


def _sample(n, c, *, scale, seed):
  """Logits z ~ N(0, scale^2) and labels y ~ Categorical(softmax(z)): z is calibrated."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, c)) * scale
  p = special.softmax(z, axis=-1)
  y = (p.cumsum(-1) > rng.random((n, 1))).argmax(-1)
  return z, y


def test_fit_matches_dense_grid_search():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(400, 10)) * 4.0
  y = rng.integers(0, 10, size=400)
  y[:250] = z[:250].argmax(-1)  # mostly right, overconfident
  got = calibration.fit_temperature(z.astype(np.float32), y)
  grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 20001))
  values = np.array([_nll(z.astype(np.float32), y, t) for t in grid])
  best = grid[values.argmin()]
  spacing = np.log(grid[1]) - np.log(grid[0])
  assert abs(np.log(got) - np.log(best)) <= spacing
  assert _nll(z.astype(np.float32), y, got) <= values.min() + 1e-12


def test_derivative_vanishes_at_the_optimum():
  z, y = _sample(3000, 8, scale=2.0, seed=1)
  z = z * 3.0
  t = calibration.fit_temperature(z, y)
  assert 0.05 < t < 20.0
  assert abs(_dnll_dt(z, y, t)) < 1e-7
  # and it is a minimum: the NLL rises on both sides
  assert _nll(z, y, t * 1.01) > _nll(z, y, t) < _nll(z, y, t / 1.01)


@pytest.mark.parametrize("k", [0.5, 2.5])
def test_scaled_calibrated_logits_recover_the_scale(k):
  """z calibrated (labels drawn from softmax(z)), logits = k z: the population optimum is T = k."""
  z, y = _sample(40000, 10, scale=1.5, seed=2)
  t = calibration.fit_temperature(k * z, y)
  np.testing.assert_allclose(t, k, rtol=0.02)


def test_calibrated_logits_give_unit_temperature():
  z, y = _sample(40000, 10, scale=1.5, seed=3)
  np.testing.assert_allclose(calibration.fit_temperature(z, y), 1.0, rtol=0.02)


def test_temperature_is_scale_equivariant():
  """T*(c z) = c T*(z): the NLL depends on z / T only."""
  z, y = _sample(2000, 6, scale=2.0, seed=4)
  t = calibration.fit_temperature(z, y)
  np.testing.assert_allclose(calibration.fit_temperature(3.0 * z, y), 3.0 * t, rtol=1e-6)


def test_ece_and_nll_improve_on_overconfident_logits():
  z, y = _sample(20000, 10, scale=1.5, seed=5)
  logits = (4.0 * z).astype(np.float32)
  t = calibration.fit_temperature(logits, y)
  report = calibration.calibration_report(logits, y, t)
  assert report["temperature"] == t
  assert report["ece_after"] <= report["ece_before"]
  assert report["ece_after"] < 0.02 < report["ece_before"]
  assert report["nll_after"] <= report["nll_before"]


def test_report_matches_metrics_and_losses():
  z, y = _sample(500, 7, scale=3.0, seed=6)
  z = z.astype(np.float32)
  mask = np.arange(500) % 3 != 0
  report = calibration.calibration_report(z, y, 2.0, num_bins=10, mask=mask)
  np.testing.assert_allclose(report["ece_before"],
                             metrics.expected_calibration_error(z, y, num_bins=10, mask=mask),
                             rtol=1e-6)
  np.testing.assert_allclose(report["ece_after"],
                             metrics.expected_calibration_error(z / 2.0, y, num_bins=10, mask=mask),
                             rtol=1e-6)
  np.testing.assert_allclose(report["nll_before"], _nll(z[mask], y[mask], 1.0), rtol=1e-5)
  np.testing.assert_allclose(report["nll_after"], _nll(z[mask], y[mask], 2.0), rtol=1e-5)
  np.testing.assert_allclose(
      report["nll_after"], np.mean(losses.softmax_cross_entropy(z[mask] / 2.0, y[mask])),
      rtol=1e-5)


def test_mask_excludes_examples_even_with_garbage():
  z, y = _sample(1000, 5, scale=2.0, seed=7)
  z = 2.0 * z
  keep = np.arange(1000) % 4 != 0
  want = calibration.fit_temperature(z[keep], y[keep])
  z_bad, y_bad = z.copy(), y.copy()
  z_bad[~keep] = np.nan
  y_bad[~keep] = -1
  assert calibration.fit_temperature(z_bad, y_bad, mask=keep) == want
  # the dropped examples would change the fit
  z_other = z.copy()
  z_other[~keep] *= 10.0
  assert calibration.fit_temperature(z_other, y) != pytest.approx(want, rel=1e-3)
  report = calibration.calibration_report(z_bad, y_bad, want, mask=keep)
  assert all(np.isfinite(v) for v in report.values())
  np.testing.assert_allclose(report["nll_after"], _nll(z[keep], y[keep], want), rtol=1e-5)


def test_leading_axes_are_examples():
  z, y = _sample(600, 4, scale=2.0, seed=8)
  want = calibration.fit_temperature(z, y)
  assert calibration.fit_temperature(z.reshape(2, 300, 4), y.reshape(2, 300)) == want


def test_fit_temperatures_one_per_replica():
  z, y = _sample(800, 6, scale=1.5, seed=9)
  stacked = np.stack([z, 2.0 * z, 0.5 * z])
  mask = np.arange(800) % 5 != 0
  got = calibration.fit_temperatures(stacked, y, mask=mask)
  assert got.shape == (3,) and got.dtype == np.float64
  want = [calibration.fit_temperature(stacked[r], y, mask=mask) for r in range(3)]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got[1] / got[0], 2.0, rtol=1e-6)


def test_soft_one_hot_labels_equal_integer_labels():
  z, y = _sample(500, 6, scale=3.0, seed=10)
  one_hot = np.eye(6, dtype=np.float32)[y]
  np.testing.assert_allclose(calibration.fit_temperature(z, one_hot),
                             calibration.fit_temperature(z, y), rtol=1e-8)
  np.testing.assert_allclose(calibration.temperature_nll(z, one_hot, 1.7),
                             _nll(z, y, 1.7), rtol=1e-12)
  a = calibration.calibration_report(z, one_hot, 1.7)
  b = calibration.calibration_report(z, y, 1.7)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6)


def test_temperature_nll_matches_numpy():
  z, y = _sample(300, 5, scale=2.0, seed=11)
  for t in (0.3, 1.0, 4.0):
    np.testing.assert_allclose(calibration.temperature_nll(z, y, t), _nll(z, y, t), rtol=1e-12)


def test_minimum_outside_the_bounds_returns_the_bound():
  rng = np.random.default_rng(12)
  z = rng.normal(size=(200, 5))
  y = z.argmax(-1)  # all correct: the NLL decreases to 0 as T -> 0
  assert calibration.fit_temperature(z, y, bounds=(0.1, 10.0)) == pytest.approx(0.1, rel=1e-9)
  y_wrong = z.argmin(-1)  # all wrong: the NLL decreases towards log C as T -> inf
  assert calibration.fit_temperature(z, y_wrong, bounds=(0.1, 10.0)) == pytest.approx(10.0,
                                                                                      rel=1e-9)


def test_high_precision_on_large_logits():
  """Logits of magnitude 1e3 (float32 softmax would saturate): the fit runs in float64."""
  z, y = _sample(5000, 10, scale=1.5, seed=13)
  t = calibration.fit_temperature((1000.0 * z).astype(np.float32), y, bounds=(1.0, 5000.0))
  np.testing.assert_allclose(t, 1000.0, rtol=0.05)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (2.0, 1.0), (1.0, np.inf), (1.0,), "ab"])
def test_bad_bounds(bounds):
  z, y = _sample(10, 3, scale=1.0, seed=14)
  with pytest.raises(ValueError, match="bounds"):
    calibration.fit_temperature(z, y, bounds=bounds)


def test_bad_inputs():
  z, y = _sample(10, 3, scale=1.0, seed=15)
  with pytest.raises(ValueError, match="no examples"):
    calibration.fit_temperature(z, y, mask=np.zeros(10))
  with pytest.raises(ValueError, match="mask"):
    calibration.fit_temperature(z, y, mask=np.ones(9))
  with pytest.raises(ValueError, match="labels"):
    calibration.fit_temperature(z, y[:5])
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    calibration.fit_temperature(z, np.full(10, 3))
  z_inf = z.copy()
  z_inf[0, 0] = np.inf
  with pytest.raises(ValueError, match="finite"):
    calibration.fit_temperature(z_inf, y)
  with pytest.raises(ValueError, match="temperature"):
    calibration.calibration_report(z, y, 0.0)
  with pytest.raises(ValueError, match="replica"):
    calibration.fit_temperatures(z[0], y[0])


def test_public_names_and_docstrings():
  public = {name for name in dir(calibration) if not name.startswith("_")
            and callable(getattr(calibration, name))
            and getattr(getattr(calibration, name), "__module__", None) == calibration.__name__}
  assert set(calibration.__all__) == public
  for name in calibration.__all__:
    doc = inspect.getdoc(getattr(calibration, name)) or ""
    assert "\nArgs:\n" in doc and "\nReturns:\n" in doc, name
