"""kdjax.losses against independent references: numpy/scipy re-implementations and closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats

from kdjax import losses

RNG = np.random.default_rng(0)
SHAPES = [(7, 5), (2, 3, 4)]  # [batch, C] and [replica, batch, C]


def _logits(shape, scale=3.0, seed=None):
  rng = RNG if seed is None else np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale).astype(np.float32)


def _labels(shape, seed=None):
  rng = RNG if seed is None else np.random.default_rng(seed)
  return rng.integers(0, shape[-1], size=shape[:-1])


def _np_kl(p, q):
  """KL(p || q) along the last axis with scipy's rel_entr (0 log 0 = 0)."""
  return special.rel_entr(p, q).sum(-1)


# --------------------------------------------------------------------------- cross-entropy / KL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_optax_smoothed_labels(shape, smoothing):
  z, y = _logits(shape), _labels(shape)
  got = losses.softmax_cross_entropy(z, y, label_smoothing=smoothing)
  targets = optax.smooth_labels(jax.nn.one_hot(y, shape[-1]), smoothing)
  want = optax.softmax_cross_entropy(z, targets)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # and against numpy directly
  q = (1 - smoothing) * np.eye(shape[-1])[y] + smoothing / shape[-1]
  np.testing.assert_allclose(got, -(q * special.log_softmax(z, -1)).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kl_divergence_matches_scipy(shape, temperature):
  t, s = _logits(shape), _logits(shape)
  got = losses.kl_divergence(t, s, temperature=temperature)
  want = _np_kl(special.softmax(t / temperature, -1), special.softmax(s / temperature, -1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert got.shape == shape[:-1]


def test_kl_per_example_temperature():
  t, s = _logits((6, 4)), _logits((6, 4))
  tau = np.array([0.5, 1, 2, 3, 4, 5], np.float32)
  got = losses.kl_divergence(t, s, temperature=tau)
  want = [_np_kl(special.softmax(t[i] / tau[i]), special.softmax(s[i] / tau[i])) for i in range(6)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 1.0), (0.9, 4.0), (1.0, 2.0)])
def test_kd_loss_matches_hinton_formula(alpha, temperature):
  s, t, y = _logits((8, 6)), _logits((8, 6)), _labels((8, 6))
  got = losses.kd_loss(s, t, y, alpha=alpha, temperature=temperature)
  ce = -special.log_softmax(s, -1)[np.arange(8), y]
  kl = _np_kl(special.softmax(t / temperature, -1), special.softmax(s / temperature, -1))
  want = (1 - alpha) * ce + alpha * temperature**2 * kl
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_kd_gradient_identity_at_unit_temperature(alpha):
  """d/ds_k of the KD loss at T = 1 is p_s,k - (1 - alpha) 1[k = y] - alpha p_t,k."""
  s, t, y = _logits((5, 7)), _logits((5, 7)), _labels((5, 7))
  grad = jax.grad(lambda s: losses.kd_loss(s, t, y, alpha=alpha, temperature=1.0).sum())(s)
  want = special.softmax(s, -1) - (1 - alpha) * np.eye(7)[y] - alpha * special.softmax(t, -1)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
  # the teacher is a constant
  grad_t = jax.grad(lambda t: losses.kd_loss(s, t, y, alpha=alpha).sum())(t)
  np.testing.assert_array_equal(grad_t, 0.0)


def test_kd_vmap_with_per_replica_hyperparameters_equals_loop():
  num_replicas = 4
  s, t, y = _logits((num_replicas, 6, 5)), _logits((num_replicas, 6, 5)), _labels((4, 6, 5))
  alphas = np.array([0.1, 0.5, 0.9, 0.0], np.float32)
  temps = np.array([1.0, 0.5, 4.0, 2.0], np.float32)

  def per_replica(s, t, y, a, tau):
    return losses.kd_loss(s, t, y, alpha=a, temperature=tau)

  got = jax.jit(jax.vmap(per_replica))(s, t, y, alphas, temps)
  for r in range(num_replicas):
    want = losses.kd_loss(s[r], t[r], y[r], alpha=float(alphas[r]), temperature=float(temps[r]))
    np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-6)
  grads = jax.vmap(jax.grad(lambda s, t, y, a, tau: per_replica(s, t, y, a, tau).sum()))(
      s, t, y, alphas, temps)
  for r in range(num_replicas):
    want = jax.grad(lambda s: losses.kd_loss(s, t[r], y[r], alpha=float(alphas[r]),
                                             temperature=float(temps[r])).sum())(s[r])
    np.testing.assert_allclose(grads[r], want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- teacher signals


def test_random_control_logits_uniform_and_keyed():
  key = jax.random.PRNGKey(3)
  x = np.asarray(losses.random_control_logits(key, (200, 50), minval=-2.0, maxval=3.0))
  assert x.shape == (200, 50) and x.min() >= -2.0 and x.max() < 3.0
  # Kolmogorov-Smirnov against U[-2, 3)
  assert stats.kstest(x.ravel(), stats.uniform(loc=-2, scale=5).cdf).pvalue > 1e-3
  np.testing.assert_array_equal(x, losses.random_control_logits(key, (200, 50), minval=-2.0,
                                                                maxval=3.0))
  other = losses.random_control_logits(jax.random.PRNGKey(4), (200, 50), minval=-2.0, maxval=3.0)
  assert not np.allclose(x, other)


@pytest.mark.parametrize("axis", [0, 1])
def test_ensemble_mean_probs_is_mixture(axis):
  t = _logits((3, 4, 6))  # members on axis 0 or batch on axis 0
  got = losses.ensemble_teacher_logits(t, axis=axis, mode="mean_probs")
  want_probs = special.softmax(t, -1).mean(axis)
  np.testing.assert_allclose(special.softmax(np.asarray(got), -1), want_probs, rtol=1e-5,
                             atol=1e-7)
  got = losses.ensemble_teacher_logits(t, axis=axis, mode="mean_logits")
  np.testing.assert_allclose(got, t.mean(axis), rtol=1e-6, atol=1e-6)


def test_ensemble_rejects_class_axis_and_bad_mode():
  with pytest.raises(ValueError, match="class axis"):
    losses.ensemble_teacher_logits(_logits((3, 4)), axis=-1)
  with pytest.raises(ValueError, match="mode"):
    losses.ensemble_teacher_logits(_logits((3, 4)), mode="median")


def test_standardize_logits_matches_numpy_and_is_affine_invariant():
  z = _logits((5, 10))
  got = np.asarray(losses.standardize_logits(z))
  want = (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(losses.standardize_logits(3.0 * z + 7.0), got, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(got.std(-1, ddof=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- ATS / ISATS


def test_asymmetric_temperature_softmax_matches_loop():
  z, y = _logits((6, 5)), _labels((6, 5))
  got = losses.asymmetric_temperature_softmax(z, y, target_temperature=4.0,
                                              nontarget_temperature=2.0)
  for i in range(6):
    scaled = [z[i, k] / (4.0 if k == y[i] else 2.0) for k in range(5)]
    np.testing.assert_allclose(got[i], special.softmax(scaled), rtol=1e-5, atol=1e-7)
  same = losses.asymmetric_temperature_softmax(z, y, target_temperature=3.0,
                                               nontarget_temperature=3.0)
  np.testing.assert_allclose(same, special.softmax(z / 3.0, -1), rtol=1e-5, atol=1e-7)


def test_ats_kd_loss_matches_formula():
  s, t, y = _logits((6, 5)), _logits((6, 5)), _labels((6, 5))
  got = losses.ats_kd_loss(s, t, y, alpha=0.7, target_temperature=5.0, nontarget_temperature=2.0)
  p_t = np.stack([special.softmax([t[i, k] / (5.0 if k == y[i] else 2.0) for k in range(5)])
                  for i in range(6)])
  ce = -special.log_softmax(s, -1)[np.arange(6), y]
  want = 0.3 * ce + 0.7 * _np_kl(p_t, special.softmax(s, -1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  got = losses.ats_kd_loss(s, t, y, alpha=0.7, target_temperature=5.0, nontarget_temperature=2.0,
                           temperature=2.0)
  want = 0.3 * ce + 0.7 * 4.0 * _np_kl(p_t, special.softmax(s / 2.0, -1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _np_ats_authors_loss(s, t, y, tp_tau, t_tau, s_tau, lamb):
  """The ATS authors' training loss (lxcnju/ATS-LargeKD, distill.py), in words: every teacher
  logit divided by t_tau except the label's, divided by tp_tau; softmax; the KD term is
  s_tau^2 times the cross-entropy of that distribution against the student's log-softmax at
  s_tau; loss = (1 - lamb) CE(label) + lamb KD. Per example (they average over the batch)."""
  taus = np.full(t.shape, t_tau, np.float64)
  taus[np.arange(len(y)), y] = tp_tau
  teacher = special.softmax(t / taus, -1)
  kd = s_tau**2 * -(teacher * special.log_softmax(s / s_tau, -1)).sum(-1)
  ce = -special.log_softmax(s, -1)[np.arange(len(y)), y]
  return (1 - lamb) * ce + lamb * kd, teacher


@pytest.mark.parametrize("tp_tau,t_tau", [(4.0, 2.0), (1.0, 5.0), (6.0, 1.0)])
def test_ats_arm_defaults_follow_the_authors_code(tp_tau, t_tau):
  """The ats arm with the default arm_options (student T = 1, weights 0.5 / 0.5 whatever the
  study's alpha and temperature) against a numpy transcription of the authors' loss: equal up to
  lamb s_tau^2 H(teacher), a constant for the student (they use cross-entropy, kdjax KL), and
  equal gradients. Any (tau_1, tau_2) order is allowed, as in their search."""
  from kdjax import arms as arms_lib  # pylint: disable=g-import-not-at-top
  from kdjax import replicas as replicas_lib  # pylint: disable=g-import-not-at-top
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top
  config = study_lib.load_config("configs/default.py")
  config.alpha, config.temperature = "0.9", "4.0"  # capacity_mismatch's: not used by ats
  config.arm_options.ats_target_temperature = tp_tau
  config.arm_options.ats_nontarget_temperature = t_tau
  options, _ = study_lib._loss_options(config)  # pylint: disable=protected-access
  ce_w, kd_w = replicas_lib.arm_weights(config)
  assert (ce_w["ats"], kd_w["ats"], options.ats_student_temperature) == (0.5, 0.5, 1.0)
  hp = arms_lib.ReplicaHParams(
      alpha=0.9, temperature=4.0, label_smoothing=0.0, kd_start=0, kd_stop=100,
      teacher_slot=0, member_slots=np.zeros(1, np.int32), member_weights=np.ones(1),
      ce_weight=ce_w["ats"], kd_weight=kd_w["ats"], fixed_weights=1.0)
  s, t, y = _logits((9, 7), seed=3), _logits((9, 7), scale=6.0, seed=4), _labels((9, 7), seed=5)
  got = arms_lib.kind_loss("ats", s, t, y, hp, 0, options)
  want, teacher = _np_ats_authors_loss(s.astype(np.float64), t.astype(np.float64), y, tp_tau,
                                       t_tau, 1.0, 0.5)
  entropy = -(teacher * np.log(teacher)).sum(-1)
  np.testing.assert_allclose(got, want - 0.5 * entropy, rtol=1e-4, atol=1e-5)
  grad = jax.grad(lambda s: arms_lib.kind_loss("ats", s, t, y, hp, 0, options).sum())(s)
  # d/ds of the authors' loss: (1 - lamb)(softmax(s) - onehot) + lamb s_tau (softmax(s/s_tau) - p_t)
  want_grad = 0.5 * (special.softmax(s, -1) - np.eye(7)[y]) + 0.5 * (special.softmax(s, -1) -
                                                                     teacher)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def _np_ats_probs(z, label, tau_1, tau_2):
  taus = np.full(z.shape, tau_2, np.float64)
  taus[label] = tau_1
  return special.softmax(z / taus)


def _np_nontarget_variance(z, label, tau_1, tau_2):
  """Population variance of the C - 1 non-target ATS probabilities (not renormalised)."""
  return np.var(np.delete(_np_ats_probs(z, label, tau_1, tau_2), label))


def _np_isats(t, y, tau_1, grid):
  """The tau_2 of `grid` with the largest non-target variance per example (first on ties)."""
  out = []
  for z, label in zip(t.reshape(-1, t.shape[-1]).astype(np.float64), y.reshape(-1)):
    variances = [_np_nontarget_variance(z, label, tau_1, tau) for tau in grid]
    out.append(grid[int(np.argmax(variances))])
  return np.array(out).reshape(y.shape)


def _teacher_like_logits(shape, seed):
  """Over-confident-teacher-like logits: the label's logit high, the others negative and
  spread, so the non-target variance has an interior maximum in tau_2."""
  rng = np.random.default_rng(seed)
  z = rng.normal(-4.0, 1.5, size=shape)
  y = rng.integers(0, shape[-1], size=shape[:-1])
  np.put_along_axis(z, y[..., None], rng.uniform(6, 12, size=shape[:-1] + (1,)), -1)
  return z.astype(np.float32), y


@pytest.mark.parametrize("tau_1", [1.0, 4.0])
def test_isats_temperature_maximises_the_nontarget_variance(tau_1):
  """The chosen tau_2 is the grid's argmax of the non-target variance of the ATS distribution
  (numpy brute force), and, with the default fine grid, within its spacing of the maximum over
  the continuous interval [1, 5] (scipy's bounded scalar search on a 2001-point bracket)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  t, y = _teacher_like_logits((60, 10), seed=7)
  grid = losses.ISATS_TEMPERATURES
  assert grid[0] == 1.0 and grid[-1] == 5.0 and len(grid) == 41
  got = np.asarray(losses.isats_temperature(t, y, target_temperature=tau_1))
  np.testing.assert_allclose(got, _np_isats(t, y, tau_1, grid), rtol=1e-6)
  assert len(np.unique(got)) > 3  # chosen per example
  for z, label, tau in zip(t.astype(np.float64), y, got):
    chosen = _np_nontarget_variance(z, label, tau_1, tau)
    assert all(chosen >= _np_nontarget_variance(z, label, tau_1, g) * (1 - 1e-5) for g in grid)
    dense = np.linspace(1.0, 5.0, 2001)
    best = dense[np.argmax([_np_nontarget_variance(z, label, tau_1, g) for g in dense])]
    lo, hi = max(1.0, best - 0.01), min(5.0, best + 0.01)
    refined = optimize.minimize_scalar(
        lambda g: -_np_nontarget_variance(z, label, tau_1, g), bounds=(lo, hi), method="bounded")
    peak = max(-refined.fun, _np_nontarget_variance(z, label, tau_1, best))
    assert chosen <= peak * (1 + 1e-6)
    assert abs(tau - (refined.x if -refined.fun >= peak else best)) <= 0.05 + 1e-6


def test_isats_is_asymmetric_and_maximises_what_the_student_sees():
  """ISATS's teacher distribution is ATS: the label keeps tau_1 while the non-target classes get
  the chosen tau_2; and the old symmetric rule (one temperature for every class) picks other
  temperatures, since it maximises a different variance."""
  t, y = _teacher_like_logits((40, 8), seed=9)
  tau_2 = np.asarray(losses.isats_temperature(t, y, target_temperature=4.0))
  symmetric = []
  for z, label in zip(t.astype(np.float64), y):
    v = [np.var(np.delete(special.softmax(z / g), label)) for g in losses.ISATS_TEMPERATURES]
    symmetric.append(losses.ISATS_TEMPERATURES[int(np.argmax(v))])
  assert np.any(np.abs(np.array(symmetric) - tau_2) > 0.05)
  s = _logits((40, 8), seed=10)
  got = losses.isats_kd_loss(s, t, y, target_temperature=4.0)  # defaults: T = 1, alpha = 0.5
  ce = -special.log_softmax(s, -1)[np.arange(40), y]
  p_t = np.stack([_np_ats_probs(z, label, 4.0, tau) for z, label, tau in
                  zip(t.astype(np.float64), y, tau_2)])
  np.testing.assert_allclose(got, 0.5 * ce + 0.5 * _np_kl(p_t, special.softmax(s, -1)),
                             rtol=1e-4, atol=1e-5)


def test_isats_arm_defaults_follow_the_authors_ats_code():
  """The isats arm with the default arm_options: the ATS authors' loss (T = 1, lamb = 0.5) with
  tau_1 = isats_target_temperature and each example's tau_2 from the numpy search."""
  from kdjax import arms as arms_lib  # pylint: disable=g-import-not-at-top
  from kdjax import replicas as replicas_lib  # pylint: disable=g-import-not-at-top
  from kdjax import study as study_lib  # pylint: disable=g-import-not-at-top
  config = study_lib.load_config("configs/default.py")
  config.temperature = "4.0"
  options, _ = study_lib._loss_options(config)  # pylint: disable=protected-access
  ce_w, kd_w = replicas_lib.arm_weights(config)
  hp = arms_lib.ReplicaHParams(
      alpha=0.9, temperature=4.0, label_smoothing=0.0, kd_start=0, kd_stop=100,
      teacher_slot=0, member_slots=np.zeros(1, np.int32), member_weights=np.ones(1),
      ce_weight=ce_w["isats"], kd_weight=kd_w["isats"], fixed_weights=1.0)
  t, y = _teacher_like_logits((16, 6), seed=12)
  s = _logits((16, 6), seed=13)
  got = arms_lib.kind_loss("isats", s, t, y, hp, 0, options)
  tau_1 = options.isats_target_temperature
  tau_2 = _np_isats(t, y, tau_1, options.isats_temperatures)
  want = []
  for i in range(16):
    loss, teacher = _np_ats_authors_loss(s[i:i + 1].astype(np.float64),
                                         t[i:i + 1].astype(np.float64), y[i:i + 1], tau_1,
                                         tau_2[i], 1.0, 0.5)
    want.append(loss[0] - 0.5 * -(teacher * np.log(teacher)).sum())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- DKD


def _np_dkd(s, t, y, alpha, beta, temperature):
  out = []
  for zs, zt, label in zip(s, t, y):
    ps, pt = special.softmax(zs / temperature), special.softmax(zt / temperature)
    bs, bt = np.array([ps[label], 1 - ps[label]]), np.array([pt[label], 1 - pt[label]])
    ns = special.softmax(np.delete(zs, label) / temperature)
    nt = special.softmax(np.delete(zt, label) / temperature)
    out.append(temperature**2 * (alpha * _np_kl(bt, bs) + beta * _np_kl(nt, ns)))
  return np.array(out)


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_numpy(alpha, beta, temperature):
  s, t, y = _logits((9, 7)), _logits((9, 7)), _labels((9, 7))
  got = losses.dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
  np.testing.assert_allclose(got, _np_dkd(s, t, y, alpha, beta, temperature), rtol=1e-4, atol=1e-5)


def test_dkd_reformulates_kd():
  """Zhao et al. Eq. (7): KD = TCKD + (1 - p_t,y) NCKD, so DKD with alpha = 1 and a per-example
  beta = 1 - p_t,y equals T^2 KL(p_t || p_s)."""
  s, t, y = _logits((9, 7)), _logits((9, 7)), _labels((9, 7))
  temperature = 2.0
  p_t_target = special.softmax(t / temperature, -1)[np.arange(9), y]
  got = losses.dkd_loss(s, t, y, alpha=1.0, beta=(1 - p_t_target).astype(np.float32),
                        temperature=temperature)
  want = temperature**2 * losses.kl_divergence(t, s, temperature=temperature)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- features, schedules


def test_feature_hint_loss_matches_numpy():
  fs, ft = _logits((4, 3, 3, 8)), _logits((4, 3, 3, 8))
  got = losses.feature_hint_loss(fs, ft)
  np.testing.assert_allclose(got, ((fs - ft)**2).reshape(4, -1).mean(-1), rtol=1e-5)
  grad = jax.grad(lambda f: losses.feature_hint_loss(f, ft).sum())(fs)
  np.testing.assert_allclose(grad, 2 * (fs - ft) / (3 * 3 * 8), rtol=1e-5, atol=1e-7)


def test_switch_schedule_and_nesting():
  sched = losses.switch_schedule(10, before=0.0, after=0.9)
  np.testing.assert_allclose([sched(s) for s in (0, 9, 10, 50)], [0, 0, 0.9, 0.9], rtol=1e-6)
  there_and_back = losses.switch_schedule(
      5, before=0.0, after=losses.switch_schedule(8, before=1.0, after=0.0))
  np.testing.assert_allclose([there_and_back(s) for s in range(10)],
                             [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
  ramp = losses.switch_schedule(4, before=optax.linear_schedule(0.0, 1.0, 4), after=1.0)
  np.testing.assert_allclose([ramp(s) for s in range(6)], [0, .25, .5, .75, 1, 1], rtol=1e-6)
  traced = jax.jit(jax.vmap(sched))(jnp.arange(12))
  np.testing.assert_allclose(traced, [0.0] * 10 + [0.9] * 2, rtol=1e-6)
  with pytest.raises(ValueError, match="boundary"):
    losses.switch_schedule(-1, before=0.0, after=1.0)
  with pytest.raises(ValueError, match="after"):
    losses.switch_schedule(3, before=0.0, after=float("nan"))


# --------------------------------------------------------------------------- robustness


def _all_losses(s, t, y, temperature):
  return {
      "ce": losses.softmax_cross_entropy(s, y, label_smoothing=0.1),
      "kl": losses.kl_divergence(t, s, temperature=temperature),
      "kd": losses.kd_loss(s, t, y, alpha=0.5, temperature=temperature),
      "ats": losses.ats_kd_loss(s, t, y, target_temperature=temperature * 2,
                                nontarget_temperature=temperature),
      "isats": losses.isats_kd_loss(s, t, y, target_temperature=temperature,
                                    temperatures=[temperature, 2 * temperature]),
      "dkd": losses.dkd_loss(s, t, y, temperature=temperature),
      "std_kd": losses.standardized_kd_loss(s, t, y, temperature=temperature),
      "fgcr": losses.fgcr_kd_loss(s, t, y, np.full((5, 5), 0.2, np.float32),
                                  temperature=temperature),
      "ens": losses.kd_loss(s, losses.ensemble_teacher_logits(jnp.stack([t, -t])), y),
  }


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_finite_values_and_gradients_at_extreme_logits(temperature):
  rng = np.random.default_rng(1)
  s = (rng.choice([-1, 1], size=(6, 5)) * 1e4).astype(np.float32)
  t = (rng.choice([-1, 1], size=(6, 5)) * 1e4).astype(np.float32)
  y = rng.integers(0, 5, size=6)
  for name, value in _all_losses(s, t, y, temperature).items():
    assert np.all(np.isfinite(value)), name
  for name in _all_losses(s, t, y, temperature):
    grad = jax.grad(lambda s: _all_losses(s, t, y, temperature)[name].sum())(s)
    assert np.all(np.isfinite(grad)), name


def test_bfloat16_logits_are_promoted():
  s, t, y = _logits((4, 5)), _logits((4, 5)), _labels((4, 5))
  got = losses.kd_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), y)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, losses.kd_loss(s, t, y), rtol=3e-2)


@pytest.mark.parametrize("call,match", [
    (lambda s, t, y: losses.kd_loss(s, t, y, alpha=1.5), r"alpha .*\[0, 1\]"),
    (lambda s, t, y: losses.kd_loss(s, t, y, alpha=-0.1), "alpha"),
    (lambda s, t, y: losses.kd_loss(s, t, y, temperature=0.0), r"temperature .*\(0, inf\)"),
    (lambda s, t, y: losses.kl_divergence(t, s, temperature=-1.0), "temperature"),
    (lambda s, t, y: losses.kd_loss(s, t, y, temperature=float("inf")), "temperature"),
    (lambda s, t, y: losses.softmax_cross_entropy(s, y, label_smoothing=2.0), "label_smoothing"),
    (lambda s, t, y: losses.dkd_loss(s, t, y, beta=-1.0), "beta"),
    (lambda s, t, y: losses.isats_temperature(t, y, target_temperature=1.0, temperatures=[]),
     "temperatures"),
    (lambda s, t, y: losses.isats_temperature(t, y, target_temperature=1.0,
                                              temperatures=[1.0, 0.0]), "temperatures"),
    (lambda s, t, y: losses.isats_temperature(t, y, target_temperature=0.0), "target_temperature"),
    (lambda s, t, y: losses.kd_loss(s, t, y, ce_weight=0.1), "ce_weight and kd_weight"),
    (lambda s, t, y: losses.kd_loss(s, t, y, ce_weight=0.1, kd_weight=-1.0), "kd_weight"),
    (lambda s, t, y: losses.ats_kd_loss(s, t, y, target_temperature=0.0,
                                        nontarget_temperature=1.0), "target_temperature"),
    (lambda s, t, y: losses.random_control_logits(jax.random.PRNGKey(0), (2,), minval=1.0,
                                                  maxval=1.0), "minval"),
])
def test_bad_hyperparameters_raise_value_error(call, match):
  s, t, y = _logits((3, 4)), _logits((3, 4)), _labels((3, 4))
  with pytest.raises(ValueError, match=match):
    call(s, t, y)


@pytest.mark.parametrize("call", [
    lambda: losses.kd_loss(np.zeros((3, 4)), np.zeros((3, 5)), np.zeros(3, int)),
    lambda: losses.kd_loss(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros(4, int)),
    lambda: losses.softmax_cross_entropy(np.zeros((3, 4)), np.zeros((3, 1), int)),
    lambda: losses.kl_divergence(np.zeros((2, 4)), np.zeros((3, 4))),
    lambda: losses.dkd_loss(np.zeros((3, 4)), np.zeros((2, 4)), np.zeros(3, int)),
    lambda: losses.feature_hint_loss(np.zeros((2, 4, 4, 8)), np.zeros((2, 4, 4, 16))),
])
def test_shape_mismatch_names_the_shapes(call):
  with pytest.raises(ValueError, match=r"\(\d+, \d+"):
    call()


def test_all_losses_jit_and_keep_leading_axes():
  s, t, y = _logits((2, 3, 5)), _logits((2, 3, 5)), _labels((2, 3, 5))
  eager = _all_losses(s, t, y, 2.0)
  jitted = jax.jit(lambda s, t: _all_losses(s, t, y, 2.0))(s, t)
  for name in eager:
    assert eager[name].shape == (2, 3), name
    np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-5, atol=1e-6)


def test_label_smoothing_is_per_replica_traceable():
  z, y = _logits((3, 4, 5)), _labels((3, 4, 5))
  eps = np.array([0.0, 0.1, 0.3], np.float32)
  got = jax.vmap(lambda z, y, e: losses.softmax_cross_entropy(z, y, label_smoothing=e))(z, y, eps)
  for r in range(3):
    np.testing.assert_allclose(
        got[r], losses.softmax_cross_entropy(z[r], y[r], label_smoothing=float(eps[r])), rtol=1e-6)


# --------------------------------------------------------------------------- FGCR / RegT


def test_class_relation_matrix_is_classwise_mean_probability():
  t, y = _logits((30, 4)), _labels((30, 4))
  y[:3] = [0, 1, 2]
  y[y == 3] = 0  # class 3 never occurs -> uniform row
  mask = (np.arange(30) < 25).astype(np.float32)
  got = np.asarray(losses.class_relation_matrix(t, y, 4, temperature=2.0, mask=mask))
  p = special.softmax(t / 2.0, -1)
  for c in range(3):
    sel = (y == c) & (mask > 0)
    np.testing.assert_allclose(got[c], p[sel].mean(0), rtol=1e-5)
  np.testing.assert_allclose(got[3], 0.25)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_fgcr_kd_loss_matches_formula_and_reduces_to_kd():
  """Fused at T = 1 with relations taken at T = 1, then softened with the study temperature:
  q^T = q^(1/T) / sum q^(1/T)."""
  s, t, y = _logits((8, 5)), _logits((8, 5)), _labels((8, 5))
  relations = special.softmax(_logits((5, 5)), -1).astype(np.float32)
  got = losses.fgcr_kd_loss(s, t, y, relations, alpha=0.6, fusion=0.3, temperature=2.0)
  q = 0.7 * special.softmax(t.astype(np.float64), -1) + 0.3 * relations[y]
  q_t = q**0.5 / (q**0.5).sum(-1, keepdims=True)
  ce = -special.log_softmax(s, -1)[np.arange(8), y]
  want = 0.4 * ce + 0.6 * 4.0 * _np_kl(q_t, special.softmax(s / 2.0, -1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      losses.fgcr_kd_loss(s, t, y, relations, alpha=0.6, fusion=0.0, temperature=2.0),
      losses.kd_loss(s, t, y, alpha=0.6, temperature=2.0), rtol=1e-4, atol=1e-4)
  got = losses.fgcr_kd_loss(s, t, y, relations, fusion=0.3, temperature=2.0, ce_weight=0.1,
                            kd_weight=9.0)
  np.testing.assert_allclose(got, 0.1 * ce + 9.0 * 4.0 * _np_kl(q_t, special.softmax(s / 2.0, -1)),
                             rtol=1e-4, atol=1e-4)


def test_fgcr_gives_an_over_confident_teacher_more_nontarget_variance():
  """What FGCR is for (arXiv 2405.13078): an over-confident teacher's non-target probabilities
  are nearly indistinct; fused with class relations that rank the classes, the distribution the
  student learns from has MORE non-target variance than the teacher's own at the same T, and
  its target probability is not raised (the old rule, relations at T = 1 fused into the teacher
  at T = 4, raised the target probability and cut the variance)."""
  c, n = 10, 200
  rng = np.random.default_rng(21)
  y = rng.integers(0, c, n)
  # Relations as kdjax computes them (class_relation_matrix, T = 1) from a teacher that ranks
  # classes: class k's affinity to class j decays with |k - j|.
  affinity = -1.5 * np.abs(np.arange(c)[:, None] - np.arange(c)[None, :])
  train_logits = affinity[y] + rng.normal(0, 0.3, (n, c))
  train_logits[np.arange(n), y] += 4.0
  relations = np.asarray(losses.class_relation_matrix(train_logits.astype(np.float32), y, c))
  # The over-confident teacher on new examples: label logit 14, the others flat (+-0.2).
  t = rng.normal(0, 0.2, (n, c))
  t[np.arange(n), y] = 14.0
  temperature = 4.0
  p_teacher = special.softmax(t / temperature, -1)
  fused = np.asarray(jax.nn.softmax(jnp.log(
      0.5 * jax.nn.softmax(jnp.asarray(t, jnp.float32), -1) + 0.5 * relations[y]) / temperature))
  # the target kdjax's loss distils towards: check it against the fused rule through the loss
  s = np.zeros((n, c), np.float32)
  kl = losses.fgcr_kd_loss(s, t.astype(np.float32), y, relations, fusion=0.5,
                           temperature=temperature, ce_weight=0.0, kd_weight=1.0)
  np.testing.assert_allclose(kl / temperature**2, _np_kl(fused, np.full((n, c), 1 / c)),
                             rtol=1e-3, atol=1e-5)
  def nontarget_var(p):
    return np.var(np.where(np.eye(c, dtype=bool)[y], np.nan, p), axis=-1, where=~np.eye(
        c, dtype=bool)[y])
  assert np.all(nontarget_var(fused) > 4 * nontarget_var(p_teacher))
  target_fused, target_teacher = fused[np.arange(n), y], p_teacher[np.arange(n), y]
  assert np.all(target_fused <= target_teacher + 1e-6)


def test_regt_loss_matches_formula():
  t, y = _logits((8, 6)), _labels((8, 6))
  got = losses.regt_loss(t, y, weight=0.5, temperature=2.0)
  want = []
  for z, label in zip(t, y):
    p_hat = special.softmax(np.delete(z, label) / 2.0)
    want.append(-special.log_softmax(z)[label] - 0.5 * np.var(5 * p_hat) / 4)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # the regulariser rewards distinct non-target probabilities: a flat non-target profile scores 0
  flat = np.array([[5.0, 1.0, 1.0, 1.0]], np.float32)
  np.testing.assert_allclose(losses.regt_loss(flat, np.array([0]), weight=3.0),
                             losses.softmax_cross_entropy(flat, np.array([0])), rtol=1e-6)


@pytest.mark.parametrize("num_classes", [3, 10, 100])
def test_regt_reward_is_bounded_by_its_weight_at_every_class_count(num_classes):
  """The reward's largest value is the weight, reached when all non-target mass sits on one
  class (closed form: Var((C - 1) onehot) = C - 2 before normalising), for any C; at C = 100 it
  was 4.9 nats with weight 0.05 before."""
  spike = np.zeros((1, num_classes), np.float32)
  spike[0, 1] = 60.0  # one non-target class takes all non-target mass
  spike[0, 0] = 80.0
  ce = losses.softmax_cross_entropy(spike, np.array([0]))
  reward = ce - losses.regt_loss(spike, np.array([0]), weight=0.05)
  np.testing.assert_allclose(reward, 0.05, rtol=1e-4)
  rng = np.random.default_rng(num_classes)
  t = rng.normal(0, 5, (50, num_classes)).astype(np.float32)
  y = rng.integers(0, num_classes, 50)
  reward = losses.softmax_cross_entropy(t, y) - losses.regt_loss(t, y, weight=0.05)
  assert np.all((reward >= -1e-6) & (reward <= 0.05 + 1e-6))


# --------------------------------------------------------------------------- soft labels


def _soft_labels(shape, seed):
  """Genuinely soft labels (mixup of two one-hot labels with a Beta weight), float32 [..., C]."""
  rng = np.random.default_rng(seed)
  a, b = rng.integers(0, shape[-1], size=(2,) + shape[:-1])
  lam = rng.beta(0.4, 0.4, size=shape[:-1] + (1,))
  return (lam * np.eye(shape[-1])[a] + (1 - lam) * np.eye(shape[-1])[b]).astype(np.float32)


_RELATIONS = special.softmax(np.random.default_rng(5).normal(size=(5, 5)), -1).astype(np.float32)

# Every loss that takes labels, as f(s, t, y) (a teacher-only loss ignores s or t).
LABELLED_LOSSES = {
    "softmax_cross_entropy": lambda s, t, y: losses.softmax_cross_entropy(s, y),
    "smoothed_cross_entropy": lambda s, t, y: losses.softmax_cross_entropy(
        s, y, label_smoothing=0.1),
    "kd_loss": lambda s, t, y: losses.kd_loss(s, t, y, alpha=0.3, temperature=2.0),
    "kd_loss_weights": lambda s, t, y: losses.kd_loss(s, t, y, ce_weight=0.1, kd_weight=0.9),
    "nkd_loss": lambda s, t, y: losses.nkd_loss(s, t, y, temperature=2.0, gamma=1.5),
    "standardized_kd_loss": lambda s, t, y: losses.standardized_kd_loss(s, t, y, temperature=2.0),
    "asymmetric_temperature_softmax": lambda s, t, y: losses.asymmetric_temperature_softmax(
        s, y, target_temperature=3.0, nontarget_temperature=1.5),
    "ats_kd_loss": lambda s, t, y: losses.ats_kd_loss(
        s, t, y, target_temperature=3.0, nontarget_temperature=1.5, temperature=2.0),
    "isats_temperature": lambda s, t, y: losses.isats_temperature(t, y, target_temperature=2.0),
    "isats_kd_loss": lambda s, t, y: losses.isats_kd_loss(s, t, y, target_temperature=2.0),
    "class_relation_matrix": lambda s, t, y: losses.class_relation_matrix(
        s, y, 5, temperature=2.0, mask=np.arange(np.size(s) // 5).reshape(np.shape(s)[:-1]) % 3 > 0),
    "fgcr_kd_loss": lambda s, t, y: losses.fgcr_kd_loss(s, t, y, _RELATIONS, fusion=0.4,
                                                        temperature=2.0),
    "regt_loss": lambda s, t, y: losses.regt_loss(s, y, weight=0.5, temperature=2.0),
    "dkd_loss": lambda s, t, y: losses.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0),
}


@pytest.mark.parametrize("name", sorted(LABELLED_LOSSES))
@pytest.mark.parametrize("shape", [(9, 5), (2, 4, 5)])
def test_one_hot_float_labels_equal_integer_labels(name, shape):
  """Values and gradients (w.r.t. both logits) agree for y and float onehot(y), also under jit."""
  fn = LABELLED_LOSSES[name]
  s, t, y = _logits(shape, seed=11), _logits(shape, seed=12), _labels(shape, seed=13)
  onehot = np.eye(shape[-1], dtype=np.float32)[y]
  np.testing.assert_allclose(fn(s, t, onehot), fn(s, t, y), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(fn)(s, t, onehot), fn(s, t, y), rtol=1e-6, atol=1e-6)
  if name == "isats_temperature":  # a grid choice: no gradient
    return
  for argnum in (0, 1):
    grad = lambda y: jax.grad(lambda s, t: jnp.sum(fn(s, t, y)), argnums=argnum)(s, t)
    np.testing.assert_allclose(grad(onehot), grad(y), rtol=1e-5, atol=1e-6)


def test_every_labelled_loss_is_covered():
  import inspect
  takes_labels = {n for n in losses.__all__
                  if "labels" in inspect.signature(getattr(losses, n)).parameters}
  assert takes_labels == {n for n in LABELLED_LOSSES if n not in ("smoothed_cross_entropy",
                                                                  "kd_loss_weights")}


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_soft_label_cross_entropy_matches_numpy(smoothing):
  z, q = _logits((8, 5), seed=21), _soft_labels((8, 5), seed=22)
  got = losses.softmax_cross_entropy(z, q, label_smoothing=smoothing)
  q_smooth = (1 - smoothing) * q + smoothing / 5
  want = -(q_smooth * special.log_softmax(z, -1)).sum(-1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, optax.softmax_cross_entropy(z, q_smooth), rtol=1e-5, atol=1e-5)
  # the gradient pulls towards q: softmax(z) - q_smooth
  grad = jax.grad(lambda z: losses.softmax_cross_entropy(z, q, label_smoothing=smoothing).sum())(z)
  np.testing.assert_allclose(grad, special.softmax(z, -1) - q_smooth, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 1.0), (0.9, 4.0)])
def test_soft_label_kd_loss_matches_numpy(alpha, temperature):
  s, t, q = _logits((8, 6), seed=23), _logits((8, 6), seed=24), _soft_labels((8, 6), seed=25)
  got = losses.kd_loss(s, t, q, alpha=alpha, temperature=temperature)
  ce = -(q * special.log_softmax(s, -1)).sum(-1)
  kl = _np_kl(special.softmax(t / temperature, -1), special.softmax(s / temperature, -1))
  np.testing.assert_allclose(got, (1 - alpha) * ce + alpha * temperature**2 * kl, rtol=1e-4,
                             atol=1e-5)


def test_soft_label_target_class_is_the_argmax_and_ce_uses_the_full_vector():
  """The target/non-target losses split at argmax(q) (the first on ties); their cross-entropy
  terms are -sum q log p."""
  s, t = _logits((8, 5), seed=26), _logits((8, 5), seed=27)
  q = _soft_labels((8, 5), seed=28)
  q[0] = [0.4, 0.1, 0.4, 0.1, 0.0]          # a tie: the first maximum, class 0, is the target
  y = np.argmax(q, -1)
  assert y[0] == 0
  ce_q = np.asarray(losses.softmax_cross_entropy(s, q))
  ce_y = np.asarray(losses.softmax_cross_entropy(s, y))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  close(losses.dkd_loss(s, t, q), losses.dkd_loss(s, t, y))
  close(losses.asymmetric_temperature_softmax(s, q, target_temperature=3.0,
                                              nontarget_temperature=1.0),
        losses.asymmetric_temperature_softmax(s, y, target_temperature=3.0,
                                              nontarget_temperature=1.0))
  np.testing.assert_array_equal(losses.isats_temperature(t, q, target_temperature=2.0),
                                losses.isats_temperature(t, y, target_temperature=2.0))
  for loss in (lambda y: losses.ats_kd_loss(s, t, y, alpha=0.3, target_temperature=3.0,
                                            nontarget_temperature=1.0),
               lambda y: losses.isats_kd_loss(s, t, y, alpha=0.3, target_temperature=2.0)):
    close(loss(q), loss(y) - 0.7 * ce_y + 0.7 * ce_q)
  regt = lambda y: losses.regt_loss(s, y, weight=0.5, temperature=2.0)
  close(regt(q), regt(y) - ce_y + ce_q)


def test_soft_label_fgcr_and_class_relations_weight_by_the_label():
  s, t = _logits((8, 5), seed=29), _logits((8, 5), seed=30)
  q = _soft_labels((8, 5), seed=31)
  # R[c] = sum_x q_c(x) softmax(t(x) / T) / sum_x q_c(x)
  p = special.softmax(t / 2.0, -1)
  want_r = (q.T @ p) / q.sum(0)[:, None]
  np.testing.assert_allclose(losses.class_relation_matrix(t, q, 5, temperature=2.0), want_r,
                             rtol=1e-5, atol=1e-6)
  # FGCR fuses the label-weighted row sum_c q_c R[c]; CE against q
  fusion, temperature, alpha = 0.4, 2.0, 0.5
  fused = (1 - fusion) * special.softmax(t, -1) + fusion * (q @ _RELATIONS)
  fused_t = special.softmax(np.log(fused) / temperature, -1)
  kl = _np_kl(fused_t, special.softmax(s / temperature, -1))
  ce = -(q * special.log_softmax(s, -1)).sum(-1)
  got = losses.fgcr_kd_loss(s, t, q, _RELATIONS, alpha=alpha, fusion=fusion,
                            temperature=temperature)
  np.testing.assert_allclose(got, (1 - alpha) * ce + alpha * temperature**2 * kl, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("labels", [
    np.zeros(3, np.float32),          # float labels must carry the class axis
    np.zeros((3, 4), np.int32),       # integer labels must not
    np.zeros((3, 5), np.float32),     # wrong number of classes
])
def test_labels_of_neither_kind_raise_value_error(labels):
  s, t = _logits((3, 4)), _logits((3, 4))
  for call in (lambda: losses.softmax_cross_entropy(s, labels),
               lambda: losses.kd_loss(s, t, labels),
               lambda: losses.dkd_loss(s, t, labels),
               lambda: losses.regt_loss(t, labels)):
    with pytest.raises(ValueError, match=r"integer class indices .* class probabilities"):
      call()
