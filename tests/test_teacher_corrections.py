"""kdjax.teacher_signals against per-example numpy loops and closed forms."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kdjax import losses, teacher_signals as ts

SHAPES = [(9, 6), (2, 5, 4)]  # [batch, C] and [replica, batch, C]


def _logits(shape, scale=3.0, seed=0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _labels(shape, seed=1):
  return np.random.default_rng(seed).integers(0, shape[-1], size=shape[:-1])


def _np_kl(p, q):
  return special.rel_entr(p, q).sum(-1)


# --------------------------------------------------------------------------- swap correction


def _np_swap(t, y):
  out = np.array(t, dtype=np.float32)
  flat_t, flat_y, flat_out = t.reshape(-1, t.shape[-1]), y.reshape(-1), out.reshape(-1, t.shape[-1])
  for i in range(len(flat_y)):
    a = int(np.argmax(flat_t[i]))
    if a != flat_y[i]:
      flat_out[i, a], flat_out[i, flat_y[i]] = flat_t[i, flat_y[i]], flat_t[i, a]
  return out


@pytest.mark.parametrize("shape", SHAPES)
def test_swap_matches_loop_and_puts_the_label_first(shape):
  t, y = _logits(shape), _labels(shape)
  got = np.asarray(ts.swap_correct_logits(t, y))
  np.testing.assert_array_equal(got, _np_swap(t, y))
  np.testing.assert_array_equal(got.argmax(-1), y)
  # the multiset of logits is preserved
  np.testing.assert_array_equal(np.sort(got, -1), np.sort(t, -1))
  # examples the teacher gets right are unchanged
  right = t.argmax(-1) == y
  np.testing.assert_array_equal(got[right], t[right])
  assert (~right).any()


def test_swap_leaves_correct_examples_bitwise_and_fixes_the_others():
  t = np.array([[3.0, 1.0, 0.0], [0.5, 2.0, -1.0], [0.0, 1.0, 5.0]], np.float32)
  y = np.array([0, 2, 1])
  got = np.asarray(ts.swap_correct_logits(t, y))
  np.testing.assert_array_equal(got, [[3.0, 1.0, 0.0], [0.5, -1.0, 2.0], [0.0, 5.0, 1.0]])
  # the swapped distribution is the teacher's with two probabilities exchanged, at any T
  for temp in (1.0, 4.0):
    p, q = special.softmax(t / temp, -1), special.softmax(got / temp, -1)
    np.testing.assert_allclose(q[1], p[1][[0, 2, 1]], rtol=1e-6)


def test_swap_soft_labels_use_the_argmax_class():
  t, y = _logits((8, 5)), _labels((8, 5))
  soft = 0.7 * np.eye(5, dtype=np.float32)[y] + 0.3 / 5
  np.testing.assert_array_equal(ts.swap_correct_logits(t, soft), ts.swap_correct_logits(t, y))
  # a mixup label 0.6 / 0.4: the 0.6 class is the target
  mix = np.zeros((1, 5), np.float32)
  mix[0, 3], mix[0, 1] = 0.6, 0.4
  got = np.asarray(ts.swap_correct_logits(t[:1], mix))
  np.testing.assert_array_equal(got, _np_swap(t[:1], np.array([3])))


def test_swap_ties():
  # target 2 ties with class 0 for the maximum: argmax is 0, the swap exchanges equal values
  t = np.array([[2.0, 1.0, 2.0]], np.float32)
  np.testing.assert_array_equal(ts.swap_correct_logits(t, np.array([2])), t)
  np.testing.assert_array_equal(ts.teacher_correct_mask(t, np.array([2])), [0.0])
  np.testing.assert_array_equal(ts.teacher_correct_mask(t, np.array([0])), [1.0])


def test_swap_jit_and_dtype():
  t, y = _logits((4, 3)), _labels((4, 3))
  got = jax.jit(ts.swap_correct_logits)(jnp.asarray(t, jnp.bfloat16), y)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, _np_swap(np.asarray(jnp.asarray(t, jnp.bfloat16),
                                                         np.float32), y))


# --------------------------------------------------------------------------- correct-only mask


@pytest.mark.parametrize("shape", SHAPES)
def test_teacher_correct_mask_matches_numpy(shape):
  t, y = _logits(shape, scale=1.0), _labels(shape)
  y = np.where(np.arange(y.size).reshape(y.shape) % 2 == 0, t.argmax(-1), y)
  got = ts.teacher_correct_mask(t, y)
  assert got.dtype == jnp.float32 and got.shape == shape[:-1]
  np.testing.assert_array_equal(got, (t.argmax(-1) == y).astype(np.float32))
  soft = np.eye(shape[-1], dtype=np.float32)[y]
  np.testing.assert_array_equal(ts.teacher_correct_mask(t, soft), got)


def test_teacher_correct_mask_bad_labels():
  with pytest.raises(ValueError, match="labels"):
    ts.teacher_correct_mask(np.zeros((3, 4)), np.zeros(4, np.int32))


# --------------------------------------------------------------------------- known classes


KNOWN = np.array([1, 0, 1, 1, 0, 1], bool)


def _np_known_kd(s, t, y, known, temperature):
  s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
  out = []
  for i, label in enumerate(y.reshape(-1)):
    if not known[label]:
      out.append(0.0)
      continue
    p = special.softmax(t2[i, known].astype(np.float64) / temperature)
    q = special.softmax(s2[i, known].astype(np.float64) / temperature)
    out.append(temperature**2 * _np_kl(p, q))
  return np.array(out).reshape(y.shape)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("batch_shape", [(12,), (2, 7)])
def test_known_class_kd_matches_renormalised_numpy(temperature, batch_shape):
  shape = batch_shape + (6,)
  s, t, y = _logits(shape, seed=2), _logits(shape, seed=3), _labels(shape, seed=4)
  got = ts.known_class_kd(s, t, y, KNOWN, temperature=temperature)
  assert got.shape == batch_shape
  np.testing.assert_allclose(got, _np_known_kd(s, t, y, KNOWN, temperature), rtol=1e-4, atol=1e-6)
  unknown = ~KNOWN[y]
  assert unknown.any()
  np.testing.assert_array_equal(np.asarray(got)[unknown], 0.0)
  np.testing.assert_array_equal(ts.known_example_mask(y, KNOWN), KNOWN[y].astype(np.float32))


def test_known_class_kd_all_known_is_plain_kd():
  s, t, y = _logits((8, 5), seed=5), _logits((8, 5), seed=6), _labels((8, 5))
  got = ts.known_class_kd(s, t, y, np.ones(5), temperature=2.0)
  np.testing.assert_allclose(got, 4.0 * losses.kl_divergence(t, s, temperature=2.0), rtol=1e-5,
                             atol=1e-6)
  # no known class: zero everywhere
  np.testing.assert_array_equal(ts.known_class_kd(s, t, y, np.zeros(5), temperature=2.0), 0.0)


def test_known_class_kd_gradients():
  s, t, y = _logits((10, 6), seed=7), _logits((10, 6), seed=8), _labels((10, 6), seed=9)

  def total(s, t):
    return jnp.sum(ts.known_class_kd(s, t, y, KNOWN.astype(np.float32), temperature=2.0))

  g_s, g_t = jax.grad(total, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  assert np.all(np.isfinite(g_s))
  np.testing.assert_array_equal(g_t, 0.0)  # the teacher is a target
  np.testing.assert_array_equal(np.asarray(g_s)[:, ~KNOWN], 0.0)  # unknown classes: no gradient
  np.testing.assert_array_equal(np.asarray(g_s)[~KNOWN[y]], 0.0)  # unknown-labelled examples
  assert np.abs(np.asarray(g_s)[KNOWN[y]][:, KNOWN]).sum() > 0
  # d L / d s_k = T (q_k - p_k) on the known classes (renormalised), T = 2
  i = int(np.flatnonzero(KNOWN[y])[0])
  p = special.softmax(t[i, KNOWN].astype(np.float64) / 2.0)
  q = special.softmax(s[i, KNOWN].astype(np.float64) / 2.0)
  np.testing.assert_allclose(np.asarray(g_s)[i, KNOWN], 2.0 * (q - p), rtol=1e-4, atol=1e-6)


def test_known_class_kd_large_logits_finite():
  s, t = _logits((6, 6), scale=1e4, seed=10), _logits((6, 6), scale=1e4, seed=11)
  y = _labels((6, 6))
  val, grad = jax.value_and_grad(
      lambda s: jnp.sum(ts.known_class_kd(s, t, y, KNOWN, temperature=0.1)))(jnp.asarray(s))
  assert np.isfinite(val) and np.all(np.isfinite(grad))


def test_known_class_kd_per_replica_class_sets_and_soft_labels():
  s, t, y = _logits((2, 5, 6), seed=12), _logits((2, 5, 6), seed=13), _labels((2, 5, 6), seed=14)
  known = np.stack([KNOWN, ~KNOWN])[:, None, :]  # [R, 1, C]
  got = ts.known_class_kd(s, t, y, known, temperature=2.0)
  for r in range(2):
    np.testing.assert_allclose(got[r], _np_known_kd(s[r], t[r], y[r], known[r, 0], 2.0),
                               rtol=1e-4, atol=1e-6)
  soft = np.eye(6, dtype=np.float32)[y]
  np.testing.assert_allclose(ts.known_class_kd(s, t, soft, known, temperature=2.0), got)
  np.testing.assert_array_equal(ts.known_example_mask(soft, known),
                                ts.known_example_mask(y, known))


def test_known_class_kd_bad_inputs():
  s, t, y = _logits((4, 6)), _logits((4, 6)), _labels((4, 6))
  with pytest.raises(ValueError, match="known_classes_mask"):
    ts.known_class_kd(s, t, y, np.ones(5), temperature=1.0)
  with pytest.raises(ValueError, match="known_classes_mask"):
    ts.known_class_kd(s, t, y, np.ones((3, 1, 6)), temperature=1.0)
  with pytest.raises(ValueError, match="temperature"):
    ts.known_class_kd(s, t, y, KNOWN, temperature=0.0)
  with pytest.raises(ValueError, match="same shape"):
    ts.known_class_kd(s, t[:, :5], y, KNOWN, temperature=1.0)


# --------------------------------------------------------------------------- mutual learning


def test_peer_mean_probabilities_matches_numpy():
  z = _logits((4, 7, 5), seed=15)
  mask = np.array([1, 0, 1, 1])
  got = ts.peer_mean_probabilities(z, mask, temperature=3.0)
  want = np.mean([special.softmax(z[p] / 3.0, -1) for p in range(4) if mask[p]], axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(ts.peer_mean_probabilities(z, temperature=3.0),
                             np.mean(special.softmax(z / 3.0, -1), 0), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="every peer"):
    ts.peer_mean_probabilities(z, np.zeros(4))
  with pytest.raises(ValueError, match="peer_mask"):
    ts.peer_mean_probabilities(z, np.ones(3))


def _np_mutual(s, z, mask, temperature):
  kls = [_np_kl(special.softmax(z[p] / temperature, -1), special.softmax(s / temperature, -1))
         for p in range(len(z)) if mask[p]]
  return temperature**2 * np.mean(kls, axis=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_mutual_kd_loss_is_the_mean_of_the_kls_to_each_peer(temperature):
  s, z = _logits((7, 5), seed=16), _logits((4, 7, 5), seed=17)
  mask = np.array([0, 1, 1, 1], bool)  # peer 0 is the student itself
  z[0] = s
  got = ts.mutual_kd_loss(s, z, mask, temperature=temperature)
  np.testing.assert_allclose(got, _np_mutual(s, z, mask, temperature), rtol=1e-4, atol=1e-6)
  # it is not the KL to the peers' mean distribution (that one is smaller, by convexity of KL)
  to_mean = ts.probability_kd_loss(s, ts.peer_mean_probabilities(z, mask, temperature=temperature),
                                   temperature=temperature)
  assert np.all(np.asarray(to_mean) <= np.asarray(got) + 1e-5)
  assert np.any(np.asarray(to_mean) < np.asarray(got) - 1e-3)
  # two networks (DML's setting): the KL to the single peer
  np.testing.assert_allclose(
      ts.mutual_kd_loss(s, z[1:2], temperature=temperature),
      temperature**2 * losses.kl_divergence(z[1], s, temperature=temperature), rtol=1e-5, atol=1e-6)


def test_mutual_kd_loss_gradients_and_traced_mask():
  s, z = _logits((2, 6, 4), seed=18), _logits((3, 2, 6, 4), seed=19)
  mask = jnp.array([1.0, 0.0, 1.0])

  def total(s, z, mask):
    return jnp.sum(ts.mutual_kd_loss(s, z, mask, temperature=2.0))

  val, (g_s, g_z) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(s, z, mask)
  np.testing.assert_allclose(val, np.sum(_np_mutual(s, z, np.asarray(mask), 2.0)), rtol=1e-4)
  np.testing.assert_array_equal(g_z, 0.0)  # the peers are targets
  assert np.all(np.isfinite(g_s))
  # per-example temperature
  tau = np.linspace(0.5, 4.0, 12).reshape(2, 6).astype(np.float32)
  got = ts.mutual_kd_loss(s, z, mask, temperature=tau)
  for b in range(2):
    for i in range(6):
      want = _np_mutual(s[b, i], z[:, b, i], np.asarray(mask), tau[b, i])
      np.testing.assert_allclose(got[b, i], want, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="peer_logits"):
    ts.mutual_kd_loss(s, z[:, 0], mask)


def test_probability_kd_loss_with_zero_targets():
  s = _logits((5, 4), seed=20)
  q = special.softmax(_logits((5, 4), seed=21), -1).astype(np.float32)
  q[:, 0] = 0.0
  q /= q.sum(-1, keepdims=True)
  got = ts.probability_kd_loss(s, q, temperature=2.0)
  np.testing.assert_allclose(got, 4.0 * _np_kl(q, special.softmax(s / 2.0, -1)), rtol=1e-4,
                             atol=1e-6)
  g = jax.grad(lambda s: jnp.sum(ts.probability_kd_loss(s, q, temperature=2.0)))(jnp.asarray(s))
  np.testing.assert_allclose(g, 2.0 * (special.softmax(s / 2.0, -1) - q), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- reliability ensembles


def test_reliability_weights_modes():
  acc = np.array([0.7, 0.8, 0.5])
  np.testing.assert_allclose(ts.reliability_weights(acc, mode="accuracy"), acc / acc.sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(ts.reliability_weights(acc, mode="softmax", tau=0.1),
                             special.softmax(acc / 0.1), rtol=1e-5)
  np.testing.assert_allclose(ts.reliability_weights(acc, mode="uniform"), np.full(3, 1 / 3))
  for mode in ("accuracy", "softmax", "uniform"):
    np.testing.assert_allclose(np.sum(ts.reliability_weights(acc, mode=mode)), 1.0, rtol=1e-6)
  # a large tau approaches the uniform weights, a small one the best member
  np.testing.assert_allclose(ts.reliability_weights(acc, mode="softmax", tau=1e4),
                             np.full(3, 1 / 3), atol=1e-4)
  np.testing.assert_allclose(ts.reliability_weights(acc, mode="softmax", tau=1e-3), [0, 1, 0],
                             atol=1e-6)
  # traced scores under jit
  np.testing.assert_allclose(jax.jit(lambda a: ts.reliability_weights(a))(acc), acc / acc.sum(),
                             rtol=1e-6)


@pytest.mark.parametrize("kwargs,scores,match", [
    ({"mode": "accuracy"}, [0.5, -0.1], "accuracy"),
    ({"mode": "accuracy"}, [0.0, 0.0], "accuracy"),
    ({"mode": "softmax", "tau": 0.0}, [0.5, 0.6], "tau"),
    ({"mode": "vote"}, [0.5, 0.6], "mode"),
    ({}, [[0.5, 0.6]], "scores"),
])
def test_reliability_weights_bad_inputs(kwargs, scores, match):
  with pytest.raises(ValueError, match=match):
    ts.reliability_weights(np.array(scores), **kwargs)


def test_weighted_ensemble_probabilities_matches_numpy():
  z = _logits((3, 6, 5), seed=22)
  w = np.array([0.2, 0.5, 0.3], np.float32)
  got = ts.weighted_ensemble_probabilities(z, w, temperature=2.0)
  want = sum(w[m] * special.softmax(z[m] / 2.0, -1) for m in range(3))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # uniform weights at T = 1: the "mean_probs" ensemble of kdjax.losses
  uniform = ts.weighted_ensemble_probabilities(z, np.full(3, 1 / 3, np.float32))
  np.testing.assert_allclose(
      uniform, jax.nn.softmax(losses.ensemble_teacher_logits(z, mode="mean_probs")), rtol=1e-5,
      atol=1e-7)
  # per-example weights [M, batch]
  w_ex = special.softmax(np.random.default_rng(23).normal(size=(3, 6)), axis=0).astype(np.float32)
  got = ts.weighted_ensemble_probabilities(z, w_ex)
  want = np.einsum("mb,mbc->bc", w_ex, special.softmax(z, -1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="weights"):
    ts.weighted_ensemble_probabilities(z, np.ones(2))
  with pytest.raises(ValueError, match="member_logits"):
    ts.weighted_ensemble_probabilities(z[0, 0], np.ones(1))


# --------------------------------------------------------------------------- public names


def test_public_names_and_docstrings():
  public = {name for name in dir(ts) if not name.startswith("_")
            and callable(getattr(ts, name))
            and getattr(getattr(ts, name), "__module__", None) == ts.__name__}
  assert set(ts.__all__) == public
  for name in ts.__all__:
    doc = inspect.getdoc(getattr(ts, name)) or ""
    assert "\nArgs:\n" in doc and "\nReturns:\n" in doc, name
