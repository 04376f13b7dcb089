"""DIST, NKD, TTM/WTTM, CTKD and attention transfer in kdjax.losses, against numpy transcriptions
of the authors' formulas written here (float64, channels-first where the authors' code is), and
closed forms for the gradient reversal layer and CTKD's schedule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kdjax import losses


def _logits(shape, scale=3.0, seed=0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _labels(shape, seed=0):
  return np.random.default_rng(seed).integers(0, shape[-1], size=shape[:-1])


def _np_softmax(z, temperature=1.0):
  return special.softmax(np.asarray(z, np.float64) / temperature, axis=-1)


# --------------------------------------------------------------------------- DIST


def _np_pearson(a, b, axis):
  """Pearson correlation along `axis`, 1e-8 added to the product of the norms (the authors')."""
  da = a - a.mean(axis, keepdims=True)
  db = b - b.mean(axis, keepdims=True)
  norms = np.sqrt((da**2).sum(axis)) * np.sqrt((db**2).sum(axis))
  return (da * db).sum(axis) / (norms + 1e-8)


def _np_dist(s, t, beta=1.0, gamma=1.0, temperature=1.0):
  """The authors' DIST on a [B, C] batch: T^2 (beta inter + gamma intra)."""
  p_s, p_t = _np_softmax(s, temperature), _np_softmax(t, temperature)
  inter = 1.0 - _np_pearson(p_s, p_t, axis=1).mean()
  intra = 1.0 - _np_pearson(p_s, p_t, axis=0).mean()
  return temperature**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 6)])
def test_dist_inter_class_matches_numpy(shape, temperature):
  s, t = _logits(shape, seed=1), _logits(shape, seed=2)
  got = losses.dist_inter_class(s, t, temperature=temperature)
  want = 1.0 - _np_pearson(_np_softmax(s, temperature), _np_softmax(t, temperature), axis=-1)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta,gamma,temperature", [(1.0, 1.0, 1.0), (1.0, 1.0, 4.0),
                                                     (0.5, 2.0, 2.0), (0.0, 1.0, 1.0)])
def test_dist_loss_matches_numpy(beta, gamma, temperature):
  s, t = _logits((16, 10), seed=3), _logits((16, 10), seed=4)
  got = losses.dist_loss(s, t, beta=beta, gamma=gamma, temperature=temperature)
  assert got.shape == ()
  np.testing.assert_allclose(got, _np_dist(s, t, beta, gamma, temperature), rtol=1e-5, atol=1e-6)


def test_dist_loss_flattens_leading_axes_into_the_batch():
  s, t = _logits((2, 4, 6), seed=5), _logits((2, 4, 6), seed=6)
  np.testing.assert_allclose(losses.dist_loss(s, t, temperature=2.0),
                             _np_dist(s.reshape(8, 6), t.reshape(8, 6), temperature=2.0),
                             rtol=1e-5)


def test_dist_loss_is_accurate_at_high_temperature_and_large_batch():
  """T = 4 over 100 classes: probabilities near 1/C that barely vary across the batch."""
  s, t = _logits((512, 100), scale=2.0, seed=7), _logits((512, 100), scale=2.0, seed=8)
  np.testing.assert_allclose(losses.dist_loss(s, t, temperature=4.0),
                             _np_dist(s, t, temperature=4.0), rtol=2e-5)


def test_dist_mask_excludes_examples_from_means_and_correlations():
  s, t = _logits((10, 7), seed=9), _logits((10, 7), seed=10)
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], np.float32)
  keep = mask > 0
  got = losses.dist_loss(s, t, mask=mask, temperature=2.0)
  np.testing.assert_allclose(got, _np_dist(s[keep], t[keep], temperature=2.0), rtol=1e-5)
  # whatever the padded rows hold, the value is the same and they get no gradient
  s2, t2 = s.copy(), t.copy()
  s2[~keep], t2[~keep] = _logits((3, 7), scale=50.0, seed=11), _logits((3, 7), seed=12)
  np.testing.assert_allclose(losses.dist_loss(s2, t2, mask=mask, temperature=2.0), got, rtol=1e-6)
  grad = jax.grad(lambda s: losses.dist_loss(s, t2, mask=mask, temperature=2.0))(s2)
  np.testing.assert_array_equal(grad[~keep], 0.0)
  assert np.all(np.isfinite(grad)) and np.any(grad[keep] != 0)
  # an all-padding batch is 0, with a zero gradient
  zero_mask = np.zeros(10, np.float32)
  assert float(losses.dist_loss(s, t, mask=zero_mask)) == 0.0
  np.testing.assert_array_equal(jax.grad(lambda s: losses.dist_loss(s, t, mask=zero_mask))(s), 0)


@pytest.mark.parametrize("num_shards", [2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_dist_psum_over_shards_equals_the_unsplit_batch(num_shards, masked):
  batch, classes = 16, 9
  s, t = _logits((batch, classes), seed=13), _logits((batch, classes), seed=14)
  mask = (np.arange(batch) % 5 != 3).astype(np.float32) if masked else np.ones(batch, np.float32)
  kwargs = dict(beta=0.7, gamma=1.3, temperature=3.0)
  whole = losses.dist_loss(s, t, mask=mask, **kwargs)
  split = lambda x: x.reshape((num_shards, batch // num_shards) + x.shape[1:])

  def sharded(s, t, m):
    return jax.vmap(functools.partial(losses.dist_loss, axis_name="data", **kwargs),
                    axis_name="data")(s, t, mask=m)

  per_shard = jax.jit(sharded)(split(s), split(t), split(mask))
  np.testing.assert_allclose(per_shard, np.full(num_shards, whole), rtol=1e-5)
  np.testing.assert_allclose(whole, _np_dist(s[mask > 0], t[mask > 0], **kwargs), rtol=1e-5)
  # the shards' mean has the unsplit loss's gradient
  grad_whole = jax.grad(lambda s: losses.dist_loss(s, t, mask=mask, **kwargs))(s)
  grad_split = jax.grad(lambda s: sharded(s, split(t), split(mask)).mean())(split(s))
  np.testing.assert_allclose(grad_split.reshape(batch, classes), grad_whole, rtol=1e-4,
                             atol=1e-7)


# --------------------------------------------------------------------------- NKD


def _np_nkd(s, t, y, temperature, gamma):
  """The authors' NKD per example: -t_y log s_y - gamma T^2 sum_{k != y} t_hat_k log s_hat_k."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  out = []
  for s_i, t_i, y_i in zip(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]),
                           np.reshape(y, -1)):
    log_s = s_i - special.logsumexp(s_i)
    t_y = np.exp(t_i[y_i] - special.logsumexp(t_i))
    rest = np.arange(s_i.size) != y_i
    s_hat, t_hat = s_i[rest] / temperature, t_i[rest] / temperature
    log_s_hat = s_hat - special.logsumexp(s_hat)
    t_hat = np.exp(t_hat - special.logsumexp(t_hat))
    out.append(-t_y * log_s[y_i] - gamma * temperature**2 * np.sum(t_hat * log_s_hat))
  return np.array(out).reshape(np.shape(y))


@pytest.mark.parametrize("temperature,gamma", [(1.0, 1.5), (3.0, 3.5), (0.5, 0.0)])
@pytest.mark.parametrize("shape", [(9, 6), (2, 3, 5)])
def test_nkd_matches_numpy(shape, temperature, gamma):
  s, t, y = _logits(shape, seed=15), _logits(shape, seed=16), _labels(shape, seed=17)
  got = losses.nkd_loss(s, t, y, temperature=temperature, gamma=gamma)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, _np_nkd(s, t, y, temperature, gamma), rtol=1e-5, atol=1e-5)


def test_nkd_nontarget_term_has_the_kl_gradient():
  """CE and KL over the non-target distributions differ by a teacher constant."""
  s, t, y = _logits((6, 5), seed=18), _logits((6, 5), seed=19), _labels((6, 5), seed=20)
  temperature, gamma = 2.0, 1.5
  rest = ~np.eye(5, dtype=bool)[y]

  def kl_form(s):
    s_hat = jnp.where(rest, s / temperature, -1e30)
    t_hat = jnp.where(rest, t / temperature, -1e30)
    log_p_t = jax.nn.log_softmax(t_hat, -1)
    kl = jnp.sum(jnp.where(rest, jnp.exp(log_p_t) * (log_p_t - jax.nn.log_softmax(s_hat, -1)),
                           0.0), -1)
    t_y = jnp.take_along_axis(jax.nn.softmax(t, -1), y[:, None], -1)[:, 0]
    log_s_y = jnp.take_along_axis(jax.nn.log_softmax(s, -1), y[:, None], -1)[:, 0]
    return jnp.sum(-t_y * log_s_y + gamma * temperature**2 * kl)

  got = jax.grad(lambda s: losses.nkd_loss(s, t, y, temperature=temperature,
                                           gamma=gamma).sum())(s)
  np.testing.assert_allclose(got, jax.grad(kl_form)(s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(9, 5), (2, 4, 5)])
def test_nkd_one_hot_float_labels_equal_integer_labels(shape):
  s, t, y = _logits(shape, seed=21), _logits(shape, seed=22), _labels(shape, seed=23)
  onehot = np.eye(shape[-1], dtype=np.float32)[y]
  fn = lambda s, t, y: losses.nkd_loss(s, t, y, temperature=2.0, gamma=1.5)
  np.testing.assert_allclose(fn(s, t, onehot), fn(s, t, y), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(fn)(s, t, onehot), fn(s, t, y), rtol=1e-6, atol=1e-6)
  for argnum in (0, 1):
    grad = lambda y: jax.grad(lambda s, t: jnp.sum(fn(s, t, y)), argnums=argnum)(s, t)
    np.testing.assert_allclose(grad(onehot), grad(y), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grad(y), 0.0)  # argnum 1: the teacher gets no gradient


def test_nkd_soft_label_target_is_the_argmax():
  s, t = _logits((4, 5), seed=24), _logits((4, 5), seed=25)
  q = np.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.3, 0.3, 0.4, 0.0, 0.0],
                [0.5, 0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.2, 0.8]], np.float32)
  np.testing.assert_allclose(losses.nkd_loss(s, t, q, temperature=2.0),
                             _np_nkd(s, t, np.array([1, 2, 0, 4]), 2.0, 1.5), rtol=1e-5)


# --------------------------------------------------------------------------- TTM / WTTM


def _np_ttm(s, t, gamma, weighted):
  """The authors' (W)TTM per example: [sum p_t^gamma *] KL(p_t^gamma / sum p_t^gamma || p_s)."""
  p_t = _np_softmax(t) ** np.asarray(gamma, np.float64)[..., None]
  norm = p_t.sum(-1)
  kl = special.rel_entr(p_t / norm[..., None], _np_softmax(s)).sum(-1)
  return norm * kl if weighted else kl


@pytest.mark.parametrize("gamma", [0.1, 0.25, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(8, 6), (2, 3, 5)])
def test_ttm_and_wttm_match_numpy(shape, gamma):
  s, t = _logits(shape, seed=26), _logits(shape, seed=27)
  ttm = losses.ttm_loss(s, t, gamma=gamma)
  wttm = losses.wttm_loss(s, t, gamma=gamma)
  assert ttm.shape == wttm.shape == shape[:-1]
  np.testing.assert_allclose(ttm, _np_ttm(s, t, gamma, False), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(wttm, _np_ttm(s, t, gamma, True), rtol=1e-5, atol=1e-6)


def test_ttm_is_kd_with_the_temperature_on_the_teacher_only():
  """p_t^gamma renormalised is softmax(t / T) with T = 1/gamma; the student is not scaled."""
  s, t = _logits((6, 7), seed=28), _logits((6, 7), seed=29)
  temperature = 4.0
  want = special.rel_entr(_np_softmax(t, temperature), _np_softmax(s)).sum(-1)
  np.testing.assert_allclose(losses.ttm_loss(s, t, gamma=1 / temperature), want, rtol=1e-5)
  # the WTTM weight lies in [1, C^(1 - gamma)] for gamma < 1
  weight = losses.wttm_loss(s, t, gamma=0.25) / losses.ttm_loss(s, t, gamma=0.25)
  assert np.all(weight >= 1 - 1e-6) and np.all(weight <= 7**0.75 + 1e-5)


def test_ttm_per_example_gamma():
  s, t = _logits((4, 5), seed=30), _logits((4, 5), seed=31)
  gammas = np.array([0.1, 0.3, 1.0, 0.5], np.float32)
  for fn, weighted in ((losses.ttm_loss, False), (losses.wttm_loss, True)):
    np.testing.assert_allclose(fn(s, t, gamma=gammas), _np_ttm(s, t, gammas, weighted),
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- CTKD


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0])
def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward(scale):
  x = np.array([0.2, -1.0, 2.5], np.float32)
  np.testing.assert_array_equal(losses.gradient_reversal(x, scale), x)
  grad = jax.grad(lambda x: jnp.sum(3.0 * jnp.sin(losses.gradient_reversal(x, scale))))(x)
  np.testing.assert_allclose(grad, -scale * 3.0 * np.cos(x), rtol=1e-6, atol=1e-7)
  # no gradient to the scale; traced scales (one per replica) work
  scale_grad = jax.grad(lambda c: jnp.sum(losses.gradient_reversal(x, c) ** 2))(
      jnp.float32(scale))
  assert float(scale_grad) == 0.0
  scales = np.array([0.0, 0.5, 2.0], np.float32)
  grads = jax.vmap(jax.grad(lambda x, c: jnp.sum(losses.gradient_reversal(x, c) ** 2)),
                   in_axes=(None, 0))(x, scales)
  np.testing.assert_allclose(grads, -scales[:, None] * 2 * x[None], rtol=1e-6)


def test_gradient_reversal_keeps_the_dtype():
  x = jnp.ones(3, jnp.bfloat16)
  grad = jax.grad(lambda x: jnp.sum(losses.gradient_reversal(x, 0.5).astype(jnp.float32)))(x)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_array_equal(grad.astype(np.float32), -0.5)


def test_ctkd_temperature_matches_the_authors_mapping_and_reverses_the_kd_gradient():
  theta, lam = 1.0, 0.4
  sig = 1 / (1 + np.exp(-theta))
  np.testing.assert_allclose(losses.ctkd_temperature(theta, lam), 1 + 20 * sig, rtol=1e-6)
  np.testing.assert_allclose(losses.ctkd_temperature(-0.5, lam, t_start=2.0, t_range=5.0),
                             2 + 5 / (1 + np.exp(0.5)), rtol=1e-6)
  s, t, y = _logits((8, 6), seed=32), _logits((8, 6), seed=33), _labels((8, 6), seed=34)

  def loss_at(temperature):
    return losses.kd_loss(s, t, y, ce_weight=0.1, kd_weight=0.9, temperature=temperature).mean()

  got = jax.grad(lambda th: loss_at(losses.ctkd_temperature(th, lam)))(jnp.float32(theta))
  # chain rule with the reversal: -lambda * dL/dT * dT/dtheta, dT/dtheta = 20 sig (1 - sig)
  d_loss_d_temperature = jax.grad(loss_at)(jnp.float32(1 + 20 * sig))
  np.testing.assert_allclose(got, -lam * d_loss_d_temperature * 20 * sig * (1 - sig), rtol=1e-5)


def _np_ctkd_cosine_decay(i, max_value, min_value, num_loops):
  """The authors' CosineDecay.get_value: the value their reversal layer multiplies by."""
  i = min(max(i, 0), num_loops)
  return (np.cos(i * np.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


@pytest.mark.parametrize("num_loops", [5, 10])
def test_ctkd_lambda_is_the_magnitude_of_the_authors_cosine_schedule(num_loops):
  epochs = np.arange(-2, 3 * num_loops)
  want = [-_np_ctkd_cosine_decay(e, 0.0, -1.0, num_loops) for e in epochs]
  got = [float(losses.ctkd_lambda(int(e), num_loops)) for e in epochs]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert got[epochs.tolist().index(0)] == 0.0 and got[-1] == 1.0
  traced = jax.jit(jax.vmap(lambda e: losses.ctkd_lambda(e, num_loops)))(jnp.asarray(epochs))
  np.testing.assert_allclose(traced, want, rtol=1e-6, atol=1e-7)
  # a general range: min_value + (max_value - min_value) (1 - cos) / 2
  np.testing.assert_allclose(losses.ctkd_lambda(2, 4, max_value=3.0, min_value=1.0), 2.0,
                             rtol=1e-6)


# --------------------------------------------------------------------------- attention transfer


def _np_attention(x_nchw, p):
  """The authors' `at` on an NCHW map: normalize(mean_c(x^p).view(N, -1)) (their code: p = 2)."""
  q = (np.abs(np.asarray(x_nchw, np.float64)) ** p).mean(1).reshape(x_nchw.shape[0], -1)
  return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def _nchw(x_nhwc):
  return np.moveaxis(x_nhwc, -1, 1)


@pytest.mark.parametrize("p", [2, 1, 4])
def test_attention_transfer_matches_numpy(p):
  f_s, f_t = _logits((3, 4, 5, 6), seed=35), _logits((3, 4, 5, 10), seed=36)  # channels differ
  a_s, a_t = _np_attention(_nchw(f_s), p), _np_attention(_nchw(f_t), p)
  np.testing.assert_allclose(losses.attention_map(f_s, p=p), a_s, rtol=1e-5, atol=1e-7)
  got = losses.attention_transfer_loss(f_s, f_t, p=p)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, ((a_s - a_t) ** 2).mean(1), rtol=1e-5, atol=1e-9)
  # the authors' at_loss is this averaged over the batch too
  np.testing.assert_allclose(got.mean(), ((a_s - a_t) ** 2).mean(), rtol=1e-5)


def test_attention_transfer_keeps_leading_axes_and_stops_the_teacher_gradient():
  f_s, f_t = _logits((2, 3, 4, 4, 5), seed=37), _logits((2, 3, 4, 4, 7), seed=38)
  got = losses.attention_transfer_loss(f_s, f_t)
  assert got.shape == (2, 3)
  for r in range(2):
    np.testing.assert_allclose(got[r], losses.attention_transfer_loss(f_s[r], f_t[r]), rtol=1e-6)
  grad_t = jax.grad(lambda f: losses.attention_transfer_loss(f_s, f).sum())(f_t)
  np.testing.assert_array_equal(grad_t, 0.0)


def test_attention_transfer_zero_maps_are_finite():
  f_s, f_t = np.zeros((2, 3, 3, 4), np.float32), _logits((2, 3, 3, 4), seed=39)
  value = losses.attention_transfer_loss(f_s, f_t)
  grad = jax.grad(lambda f: losses.attention_transfer_loss(f, f_t).sum())(f_s)
  assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("student,teacher", [((2, 4, 4, 3), (2, 5, 4, 3)),
                                             ((2, 4, 4, 3), (3, 4, 4, 3)),
                                             ((4, 4), (4, 4))])
def test_attention_transfer_shape_mismatch_is_one_clear_error(student, teacher):
  with pytest.raises(ValueError, match=r"same \[\.\.\., H, W\].*\(.*\) and \(.*\)") as info:
    losses.attention_transfer_loss(np.zeros(student, np.float32), np.zeros(teacher, np.float32))
  assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- all of them


def _all(s, t, y, temperature):
  f_s, f_t = s.reshape(s.shape[0], 1, -1, 1), t.reshape(t.shape[0], 1, -1, 1)
  return {
      "dist_inter_class": losses.dist_inter_class(s, t, temperature=temperature),
      "dist_loss": losses.dist_loss(s, t, temperature=temperature),
      "dist_loss_masked": losses.dist_loss(s, t, mask=np.arange(s.shape[0]) % 3 > 0,
                                           temperature=temperature),
      "nkd_loss": losses.nkd_loss(s, t, y, temperature=temperature),
      "ttm_loss": losses.ttm_loss(s, t, gamma=1 / temperature),
      "wttm_loss": losses.wttm_loss(s, t, gamma=1 / temperature),
      "ctkd_kd": losses.kd_loss(s, t, y, temperature=losses.ctkd_temperature(
          jnp.float32(temperature), 0.5, t_start=0.1, t_range=temperature)),
      "attention_transfer": losses.attention_transfer_loss(f_s, f_t),
      "attention_transfer_p4": losses.attention_transfer_loss(f_s, f_t, p=4),
  }


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_finite_values_and_gradients_at_extreme_logits(temperature):
  rng = np.random.default_rng(40)
  s = (rng.choice([-1, 1], size=(6, 5)) * 1e4).astype(np.float32)
  t = (rng.choice([-1, 1], size=(6, 5)) * 1e4).astype(np.float32)
  y = rng.integers(0, 5, size=6)
  for name, value in _all(s, t, y, temperature).items():
    assert np.all(np.isfinite(value)), name
  for name in _all(s, t, y, temperature):
    grad = jax.grad(lambda s: jnp.sum(_all(s, t, y, temperature)[name]))(s)
    assert np.all(np.isfinite(grad)), name


def test_bfloat16_inputs_are_promoted():
  s, t, y = _logits((8, 5), seed=41), _logits((8, 5), seed=42), _labels((8, 5), seed=43)
  for name, value in _all(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), y,
                          2.0).items():
    assert value.dtype == jnp.float32, name
    np.testing.assert_allclose(value, _all(s, t, y, 2.0)[name], rtol=5e-2, atol=2e-2,
                               err_msg=name)


# Each: (per-replica call with traced hyperparameters h, the hyperparameters' values per replica).
PER_REPLICA = {
    "dist_loss": (lambda s, t, y, h: losses.dist_loss(s, t, beta=h[0], gamma=h[1],
                                                      temperature=h[2]),
                  [[1.0, 1.0, 1.0], [0.5, 2.0, 4.0], [0.0, 1.0, 0.5]]),
    "dist_inter_class": (lambda s, t, y, h: losses.dist_inter_class(s, t, temperature=h[0]),
                         [[1.0], [4.0], [0.5]]),
    "nkd_loss": (lambda s, t, y, h: losses.nkd_loss(s, t, y, temperature=h[0], gamma=h[1]),
                 [[1.0, 1.5], [3.0, 3.5], [0.5, 0.0]]),
    "ttm_loss": (lambda s, t, y, h: losses.ttm_loss(s, t, gamma=h[0]), [[0.1], [0.5], [1.0]]),
    "wttm_loss": (lambda s, t, y, h: losses.wttm_loss(s, t, gamma=h[0]), [[0.1], [0.5], [1.0]]),
    "ctkd_kd": (lambda s, t, y, h: losses.kd_loss(
        s, t, y, temperature=losses.ctkd_temperature(h[0], h[1])),
                [[1.0, 0.0], [-2.0, 0.5], [0.3, 1.0]]),
    "ctkd_lambda": (lambda s, t, y, h: losses.ctkd_lambda(h[0], 10, max_value=h[1]) * s[0, 0],
                    [[0.0, 1.0], [3.0, 1.0], [12.0, 2.0]]),
    "attention_transfer": (lambda s, t, y, h: losses.attention_transfer_loss(
        s.reshape(-1, 2, 5, 1), t.reshape(-1, 5, 2, 1).swapaxes(1, 2), p=h[0]),
                           [[2.0], [1.0], [4.0]]),
}


@pytest.mark.parametrize("name", sorted(PER_REPLICA))
def test_vmapped_per_replica_hyperparameters_equal_a_python_loop(name):
  fn, values = PER_REPLICA[name]
  hypers = np.array(values, np.float32)
  num_replicas = len(hypers)
  s, t = _logits((num_replicas, 6, 5), seed=44), _logits((num_replicas, 6, 5), seed=45)
  y = _labels((num_replicas, 6, 5), seed=46)
  got = jax.jit(jax.vmap(fn))(s, t, y, hypers)
  grads = jax.vmap(jax.grad(lambda s, t, y, h: jnp.sum(fn(s, t, y, h))))(s, t, y, hypers)
  for r in range(num_replicas):
    python_hypers = [float(v) for v in hypers[r]]
    np.testing.assert_allclose(got[r], fn(s[r], t[r], y[r], python_hypers), rtol=1e-5, atol=1e-6)
    want = jax.grad(lambda s: jnp.sum(fn(s, t[r], y[r], python_hypers)))(s[r])
    np.testing.assert_allclose(grads[r], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda s, t, y: losses.dist_loss(s, t, beta=-1.0), "beta"),
    (lambda s, t, y: losses.dist_loss(s, t, gamma=float("nan")), "gamma"),
    (lambda s, t, y: losses.dist_loss(s, t, temperature=0.0), r"temperature .*\(0, inf\)"),
    (lambda s, t, y: losses.dist_loss(s, t, temperature=np.ones(3, np.float32)),
     "one temperature"),
    (lambda s, t, y: losses.dist_loss(s, t, mask=np.ones(4)), r"mask .*\(3,\)"),
    (lambda s, t, y: losses.dist_loss(s[0], t[0]), "batch axis"),
    (lambda s, t, y: losses.dist_inter_class(s, t, temperature=-1.0), "temperature"),
    (lambda s, t, y: losses.nkd_loss(s, t, y, gamma=-0.5), "gamma"),
    (lambda s, t, y: losses.nkd_loss(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: losses.nkd_loss(s, t, y[:2]), "labels"),
    (lambda s, t, y: losses.ttm_loss(s, t, gamma=0.0), r"gamma .*\(0, inf\)"),
    (lambda s, t, y: losses.wttm_loss(s, t, gamma=-1.0), "gamma"),
    (lambda s, t, y: losses.wttm_loss(s, t[:2], gamma=0.5), r"\(3, 4\) and \(2, 4\)"),
    (lambda s, t, y: losses.gradient_reversal(s, -0.1), "scale"),
    (lambda s, t, y: losses.ctkd_temperature(1.0, -1.0), "lambda_"),
    (lambda s, t, y: losses.ctkd_temperature(1.0, 0.5, t_start=0.0), "t_start"),
    (lambda s, t, y: losses.ctkd_temperature(1.0, 0.5, t_range=-1.0), "t_range"),
    (lambda s, t, y: losses.ctkd_lambda(3, 0), "total_steps"),
    (lambda s, t, y: losses.ctkd_lambda(3, 10.5), "total_steps"),
    (lambda s, t, y: losses.ctkd_lambda(3, 10, max_value=-1.0), "max_value"),
    (lambda s, t, y: losses.attention_map(s.reshape(3, 2, 2, 1), p=0.5), r"p .*\[1, inf\)"),
    (lambda s, t, y: losses.attention_map(s), r"\[\.\.\., H, W, C\]"),
])
def test_bad_hyperparameters_raise_value_error(call, match):
  s, t, y = _logits((3, 4), seed=47), _logits((3, 4), seed=48), _labels((3, 4), seed=49)
  with pytest.raises(ValueError, match=match):
    call(s, t, y)
