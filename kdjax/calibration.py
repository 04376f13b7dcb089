"""Post-hoc temperature scaling of a classifier's logits (Guo et al. 2017): fit on a held-out split,
report the calibration before and after. Pure functions, importable on their own.

Conventions: class axis last, any leading axes (all of them are examples, as in the dataset
scalars of kdjax.metrics); `labels` are integer class indices of shape `logits.shape[:-1]` or soft
labels (class probabilities) of shape `logits.shape`, as in kdjax.losses; `mask` has shape
`logits.shape[:-1]`, its zero entries are ignored even when their logits/labels are garbage.

The fit runs on the host in float64 (numpy/scipy; JAX computes in float32 unless x64 is enabled,
and the NLL's flat optimum needs the precision): call it once per held-out split, outside jit.

Notation: z = logits [N, C], y = label, T > 0 the temperature, beta = 1 / T,
NLL(T) = (1/N) sum_i -log softmax(z_i / T)_{y_i}.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy import optimize, special

from kdjax import _checks
from kdjax import losses
from kdjax import metrics

# The public functions (constants stay importable by name).
__all__ = [
    "temperature_nll",
    "fit_temperature",
    "fit_temperatures",
    "calibration_report",
]

# The default search interval for T: wider than any temperature reported for trained networks
# (Guo et al. 2017, Table 5 of the arXiv version: 1.0 - 3.0 on CIFAR/ImageNet/SVHN; underfit or
# heavily regularised networks can be underconfident, T < 1).
DEFAULT_BOUNDS = (0.05, 20.0)

# Points of the log-spaced grid that brackets the minimum before Brent's method refines it.
_GRID_POINTS = 33


def _host_inputs(logits, labels, mask) -> tuple[np.ndarray, np.ndarray, bool]:
  """(logits [n, C] float64, labels [n] int or [n, C] float64, soft?) of the unmasked examples."""
  soft = losses._labels_are_soft("logits", logits, "labels", labels)
  z = np.asarray(logits, dtype=np.float64)
  y = np.asarray(labels, dtype=np.float64 if soft else np.int64)
  num_classes = z.shape[-1]
  z = z.reshape(-1, num_classes)
  y = y.reshape(-1, num_classes) if soft else y.reshape(-1)
  if mask is not None:
    if tuple(np.shape(mask)) != tuple(np.shape(logits))[:-1]:
      raise ValueError(f"mask must have shape logits.shape[:-1] = {tuple(np.shape(logits))[:-1]}, "
                       f"got {tuple(np.shape(mask))}")
    keep = np.asarray(mask).reshape(-1) != 0
    z, y = z[keep], y[keep]
  if z.shape[0] == 0:
    raise ValueError("no examples to fit the temperature on (empty input or all masked)")
  if not np.all(np.isfinite(z)):
    raise ValueError("logits of the unmasked examples must be finite")
  if not soft and (np.any(y < 0) or np.any(y >= num_classes)):
    raise ValueError(f"labels of the unmasked examples must lie in [0, {num_classes}), got "
                     f"[{y.min()}, {y.max()}]")
  return z, y, soft


def _nll(z: np.ndarray, y: np.ndarray, soft: bool, beta: float) -> float:
  """Mean NLL of softmax(beta z) on host float64: mean_i logsumexp(beta z_i) - beta <q_i, z_i>."""
  lse = special.logsumexp(beta * z, axis=-1)
  if soft:
    # -sum_k q_k log p_k = (sum_k q_k) logsumexp - beta <q, z>; soft labels need not sum to 1.
    return float(np.mean(np.sum(y, axis=-1) * lse - beta * np.sum(y * z, axis=-1)))
  return float(np.mean(lse - beta * np.take_along_axis(z, y[:, None], axis=-1)[:, 0]))


def _check_bounds(bounds) -> tuple[float, float]:
  try:
    low, high = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise ValueError(f"bounds must be a pair (low, high) with 0 < low < high, got {bounds!r}")
  if not (np.isfinite(low) and np.isfinite(high) and 0.0 < low < high):
    raise ValueError(f"bounds must be a pair (low, high) with 0 < low < high, got {bounds!r}")
  return low, high


def temperature_nll(logits, labels, temperature, *, mask=None) -> float:
  """The mean negative log-likelihood of softmax(logits / T) on host float64, the objective that
  `fit_temperature` minimises:

    NLL(T) = (1/N) sum_i [ logsumexp_k(z_ik / T) - z_{i,y_i} / T ]

  (with a soft label q_i: (1/N) sum_i -sum_k q_ik log softmax(z_i / T)_k), over the N unmasked
  examples.

  Args:
    logits: [..., C] logits; every leading axis is an example axis.
    labels: integer class indices [...] or class probabilities [..., C].
    temperature: T > 0, a Python number.
    mask: optional, shape `logits.shape[:-1]`; zero entries are ignored.

  Returns:
    The mean NLL in nats, a Python float.
  """
  _checks.check_range("temperature", temperature, low=0.0, low_inclusive=False)
  z, y, soft = _host_inputs(logits, labels, mask)
  return _nll(z, y, soft, 1.0 / float(temperature))


def fit_temperature(logits, labels, *, mask=None, bounds=DEFAULT_BOUNDS) -> float:
  """The temperature T > 0 that minimises the mean NLL of softmax(logits / T) on a held-out split
  (temperature scaling, Guo et al., ICML 2017, "On Calibration of Modern Neural Networks",
  arXiv 1706.04599; reference code gpleiss/temperature_scaling, `ModelWithTemperature.
  set_temperature`):

    T* = argmin_{T in [low, high]} (1/N) sum_i -log softmax(z_i / T)_{y_i}.

  Dividing by one scalar does not change the argmax, so accuracy is unchanged; only the
  confidence moves (T > 1 softens an overconfident model, T < 1 sharpens an underconfident one).

  Why the minimum found is the global one. In beta = 1/T the objective is
    f(beta) = (1/N) sum_i [ logsumexp_k(beta z_ik) - beta z_{i,y_i} ],
  a log-sum-exp of functions linear in beta minus a linear function, hence convex:
  f'(beta) = (1/N) sum_i (E_{p_beta}[z_i] - z_{i,y_i}) and f''(beta) = (1/N) sum_i
  Var_{p_beta}(z_i) >= 0, p_beta = softmax(beta z_i). A convex function of beta is unimodal, and
  so is its composition with the monotone map log T = -log beta: the NLL as a function of log T has
  no local minimum other than the global one (it may have a flat bottom only where every
  example's logits are constant). The search therefore (1) evaluates the NLL on a log-spaced grid
  of 33 points over `bounds`, (2) refines the best grid point with scipy's bounded Brent method
  (`minimize_scalar(method="bounded")`) on log T inside the two neighbouring grid cells, a bracket
  that contains the minimiser by unimodality, to |d log T| <= 1e-10. When the minimum lies outside
  `bounds` (e.g. T -> 0 for separable data where every example is classified correctly, T -> inf
  when most predictions are wrong) the nearer bound is returned.

  Guo et al. optimise the same objective with L-BFGS on T directly (the reference code:
  `optim.LBFGS([temperature], lr=0.01, max_iter=200)` from T = 1.5, in float32 on the GPU);
  the 1-D bracketed search here reaches the same minimiser without a learning rate or a starting
  point, and in float64 on the host.

  Args:
    logits: [..., C] logits of the held-out split; every leading axis is an example axis.
    labels: integer class indices [...] or class probabilities [..., C] (then the NLL is
      -sum_k q_k log softmax(z / T)_k).
    mask: optional, shape `logits.shape[:-1]`; zero entries are ignored.
    bounds: (low, high), 0 < low < high: the interval searched for T.

  Returns:
    T*, a Python float in [low, high].
  """
  low, high = _check_bounds(bounds)
  z, y, soft = _host_inputs(logits, labels, mask)

  def objective(log_t: float) -> float:
    return _nll(z, y, soft, float(np.exp(-log_t)))

  grid = np.linspace(np.log(low), np.log(high), _GRID_POINTS)
  values = np.array([objective(g) for g in grid])
  best = int(np.argmin(values))
  lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, _GRID_POINTS - 1)]
  result = optimize.minimize_scalar(objective, bounds=(lo, hi), method="bounded",
                                    options={"xatol": 1e-10, "maxiter": 500})
  # Brent's bounded method never evaluates its interval's ends, and the grid holds both bounds:
  # keep the grid point when it is at least as good (a minimum at a bound returns the bound).
  log_t = float(result.x) if result.fun < values[best] else float(grid[best])
  return float(np.clip(np.exp(log_t), low, high))


def fit_temperatures(logits, labels, *, mask=None, bounds=DEFAULT_BOUNDS) -> np.ndarray:
  """One temperature per replica (teacher): `fit_temperature` on each `logits[r]` with the shared
  labels and mask of the held-out split.

  Args:
    logits: [R, ..., C] logits of R models on the same held-out examples.
    labels: the examples' labels, shared by all replicas: integer class indices of shape
      `logits.shape[1:-1]` or class probabilities of shape `logits.shape[1:]`.
    mask: optional, shape `logits.shape[1:-1]`; zero entries are ignored.
    bounds: (low, high), 0 < low < high: the interval searched for each T.

  Returns:
    float64 [R], the fitted temperatures.
  """
  _check_bounds(bounds)
  if np.ndim(logits) < 2:
    raise ValueError(f"logits must have a replica axis and a class axis, [R, ..., C], got shape "
                     f"{tuple(np.shape(logits))}")
  logits = np.asarray(logits)
  return np.array([fit_temperature(logits[r], labels, mask=mask, bounds=bounds)
                   for r in range(logits.shape[0])], dtype=np.float64)


def calibration_report(logits, labels, temperature, *, num_bins: int = metrics.ECE_NUM_BINS,
                       mask=None) -> dict[str, float]:
  """Calibration of softmax(logits) before and of softmax(logits / T) after temperature scaling:
  the expected calibration error (`kdjax.metrics.expected_calibration_error`, equal-width
  right-closed bins, Guo et al.'s 15 by default) and the mean NLL
  (`kdjax.losses.softmax_cross_entropy`) over the unmasked examples. Accuracy is the same before
  and after (dividing by T > 0 keeps the argmax).

  Args:
    logits: [..., C] logits; every leading axis is an example axis.
    labels: integer class indices [...] or class probabilities [..., C] (the NLL uses the full
      vector, the ECE's "correct" the argmax class of a soft label).
    temperature: T > 0, a Python number (e.g. from `fit_temperature`).
    num_bins: the ECE's number of bins, an integer >= 1.
    mask: optional, shape `logits.shape[:-1]`; zero entries are ignored.

  Returns:
    {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"} as Python floats
    (NaN ECE/NLL when no example is kept).
  """
  _checks.check_range("temperature", temperature, low=0.0, low_inclusive=False)
  soft = losses._labels_are_soft("logits", logits, "labels", labels)
  logits = losses._as_float(logits)
  hard = losses._target_class(labels) if soft else jnp.asarray(labels)
  keep = metrics._mask_or_ones(mask, logits.shape[:-1])
  count = jnp.sum(keep)
  if not soft:
    # Masked-out entries may hold garbage labels (-1): give them class 0 before indexing.
    labels = jnp.where(keep, hard, 0)

  def mean_nll(z):
    nll = losses.softmax_cross_entropy(z, labels)
    return float(metrics._safe_divide(jnp.sum(jnp.where(keep, nll, 0.0)), count))

  scaled = logits / float(temperature)
  return {
      "temperature": float(temperature),
      "ece_before": float(metrics.expected_calibration_error(logits, hard, num_bins=num_bins,
                                                             mask=keep)),
      "ece_after": float(metrics.expected_calibration_error(scaled, hard, num_bins=num_bins,
                                                            mask=keep)),
      "nll_before": mean_nll(logits),
      "nll_after": mean_nll(scaled),
  }
