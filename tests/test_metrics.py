"""Tests for kdjax.metrics against independent numpy/scipy/sklearn references and closed forms."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats
import sklearn.metrics

from kdjax import metrics

SHAPES = [(5,), (7, 5), (2, 3, 5)]  # leading axes: none, batch, replica x batch; C = 5
LARGE = 1e4


# ------------------------------------------------------------------------------------------------
# Numpy references (float64), written from the definitions in docs/design.md.


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def rows(x):
  """Flatten the leading axes: [..., C] -> [N, C]."""
  x = np.asarray(x)
  return x.reshape(-1, x.shape[-1])


def np_per_example(fn, *arrays):
  """Apply fn(row_a, row_b, ...) to every example and restore the leading shape."""
  lead = np.shape(arrays[0])[:-1]
  flat = [rows(a) if np.ndim(a) == len(lead) + 1 else np.reshape(a, -1) for a in arrays]
  return np.array([fn(*xs) for xs in zip(*flat)], np.float64).reshape(lead)


def np_js(a, b):
  return scipy.spatial.distance.jensenshannon(np_softmax(a), np_softmax(b)) ** 2


def np_rank_disagreement(a, b, k=None):
  k = len(a) if k is None else k
  return np.mean(np.argsort(-a, kind="stable")[:k] != np.argsort(-b, kind="stable")[:k])


def np_ece(logits, labels, num_bins=15):
  p = np_softmax(rows(logits))
  conf, correct = p.max(-1), p.argmax(-1) == np.reshape(labels, -1)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  ece = 0.0
  for lower, upper in zip(edges[:-1], edges[1:]):
    in_bin = (conf > lower) & (conf <= upper)
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
  return ece


def np_similarity(s, t, y):
  """Every docs/design.md dataset metric of one student against its teacher, from scratch."""
  ps, pt = np_softmax(s), np_softmax(t)
  a_s, a_t = ps.argmax(-1), pt.argmax(-1)
  agree = a_s == a_t
  return {
      "accuracy": np.mean(a_s == y),
      "agreement": np.mean(agree),
      "agree_when_teacher_correct": np.mean(agree[a_t == y]),
      "agree_when_teacher_incorrect": np.mean(agree[a_t != y]),
      "js_divergence": np.mean([np_js(a, b) for a, b in zip(s, t)]),
      "activation_distance": np.mean(np.linalg.norm(ps - pt, axis=-1)),
      "kl_divergence": np.mean(scipy.stats.entropy(pt, ps, axis=-1)),
      "rank_disagreement": np.mean([np_rank_disagreement(a, b) for a, b in zip(s, t)]),
      "mutual_information": sklearn.metrics.mutual_info_score(a_s, a_t),
      "ece": np_ece(s, y),
  }


def jitted(fn, **kwargs):
  """fn with its keyword hyperparameters bound, under jit: one compilation per shape instead of
  dozens of eagerly dispatched ops (much faster on XLA:CPU), and jit coverage for free."""
  return jax.jit(functools.partial(fn, **kwargs))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def logits_pair(rng, shape, scale=2.0):
  return (rng.normal(scale=scale, size=shape).astype(np.float32),
          rng.normal(scale=scale, size=shape).astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Per-example metrics vs references, several leading-axis shapes.


@pytest.mark.parametrize("shape", SHAPES)
def test_pairwise_metrics_match_reference(rng, shape):
  a, b = logits_pair(rng, shape)
  pa, pb = np_softmax(a), np_softmax(b)
  checks = {
      "js": (jitted(metrics.js_divergence)(a, b), np_per_example(np_js, a, b)),
      "act": (jitted(metrics.activation_distance)(a, b), np.linalg.norm(pa - pb, axis=-1)),
      "kl": (jitted(metrics.kl_divergence)(a, b), scipy.stats.entropy(pa, pb, axis=-1)),
      "rank": (jitted(metrics.rank_disagreement)(a, b),
               np_per_example(np_rank_disagreement, a, b)),
      "rank_k2": (jitted(metrics.rank_disagreement, k=2)(a, b),
                  np_per_example(lambda x, z: np_rank_disagreement(x, z, 2), a, b)),
      "agree": (jitted(metrics.agreement)(a, b), (pa.argmax(-1) == pb.argmax(-1)).astype(float)),
  }
  for name, (got, want) in checks.items():
    assert got.shape == shape[:-1], name
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_label_metrics_match_reference(rng, shape):
  z, _ = logits_pair(rng, shape)
  y = rng.integers(0, shape[-1], size=shape[:-1])
  p = np_softmax(z)
  want_conf = np_per_example(lambda pi, yi: pi[yi], p, y)
  want_var = np_per_example(lambda pi, yi: np.var(np.delete(pi, yi)), p, y)
  np.testing.assert_allclose(jitted(metrics.confidence)(z, y), want_conf, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jitted(metrics.nontarget_variance)(z, y), want_var, rtol=1e-4,
                             atol=1e-9)


def test_logit_transform():
  p = np.array([0.0, 1e-9, 0.2, 0.5, 0.9, 1.0], np.float32)
  eps = 1e-6
  want = scipy.special.logit(np.clip(p.astype(np.float64), eps, 1 - eps))
  got = metrics.logit_transform(p, eps=eps)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[0], -got[-1], rtol=1e-6)  # symmetric clipping
  np.testing.assert_allclose(metrics.logit_transform(p[2:5].reshape(3, 1)).ravel(),
                             scipy.special.logit(p[2:5]), rtol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(metrics.logit_transform(x)))(p)
  assert np.all(np.isfinite(grad))
  with pytest.raises(ValueError, match="eps"):
    metrics.logit_transform(p, eps=0.5)


def test_rank_disagreement_ties_are_stable_lowest_index_first(rng):
  # Integer logits give many ties; numpy's stable argsort of -x is the documented convention.
  a = rng.integers(0, 3, size=(20, 6)).astype(np.float32)
  b = rng.integers(0, 3, size=(20, 6)).astype(np.float32)
  np.testing.assert_allclose(metrics.rank_disagreement(a, b),
                             np_per_example(np_rank_disagreement, a, b), atol=1e-7)
  # All tied vs one raised class: orders [0, 1, 2] and [1, 0, 2] differ at two of three positions.
  np.testing.assert_allclose(metrics.rank_disagreement(np.zeros(3), np.array([0., 1., 0.])),
                             2 / 3, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Closed forms and numerical stability.


def test_closed_forms():
  c = 6
  z = np.random.default_rng(1).normal(size=(4, c)).astype(np.float32)
  np.testing.assert_allclose(metrics.js_divergence(z, z), 0.0, atol=1e-7)
  np.testing.assert_allclose(metrics.activation_distance(z, z), 0.0, atol=1e-7)
  one_hot_a = LARGE * np.eye(c, dtype=np.float32)[[0, 1, 2]]
  one_hot_b = LARGE * np.eye(c, dtype=np.float32)[[3, 4, 5]]
  np.testing.assert_allclose(metrics.activation_distance(one_hot_a, one_hot_b), math.sqrt(2),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics.js_divergence(one_hot_a, one_hot_b), math.log(2), rtol=1e-6)
  # Reversed order: for odd C only the middle rank agrees; for even C none.
  for num in (5, 6):
    up = np.arange(num, dtype=np.float32)
    want = (num - 1) / num if num % 2 else 1.0
    np.testing.assert_allclose(metrics.rank_disagreement(up, -up), want, rtol=1e-6)


def test_js_bounded_by_log2(rng):
  a, b = logits_pair(rng, (200, 4), scale=30.0)
  js = np.asarray(metrics.js_divergence(a, b))
  assert np.all(js >= 0.0) and np.all(js <= math.log(2) + 1e-7)
  np.testing.assert_allclose(js, np_per_example(np_js, a, b), atol=1e-5)


def test_js_zero_probabilities_from_inf_logits():
  a = np.array([0.0, -np.inf, 0.0], np.float32)
  b = np.array([0.0, 0.0, -np.inf], np.float32)
  want = scipy.spatial.distance.jensenshannon([0.5, 0.0, 0.5], [0.5, 0.5, 0.0]) ** 2
  np.testing.assert_allclose(metrics.js_divergence(a, b), want, rtol=1e-6)
  # A class that is impossible under both (p = q = 0) adds nothing, and no NaN gradient.
  a4, b4 = np.append(a, -np.inf), np.append(b, -np.inf)
  value, grad = jax.value_and_grad(metrics.js_divergence)(a4, b4)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(grad)[[0, 2]]))


def test_large_logits_values_and_grads_finite(rng):
  a = (LARGE * rng.normal(size=(4, 5))).astype(np.float32)
  b = (LARGE * rng.normal(size=(4, 5))).astype(np.float32)
  # The teacher b is right on two examples, wrong on two: every conditional mean is defined.
  y = np.where(np.arange(4) < 2, b.argmax(-1), (b.argmax(-1) + 1) % 5)
  differentiable = {
      "js": lambda x: metrics.js_divergence(x, b),
      "js_same": lambda x: metrics.js_divergence(x, a),
      "act": lambda x: metrics.activation_distance(x, b),
      "act_same": lambda x: metrics.activation_distance(x, a),
      "kl": lambda x: metrics.kl_divergence(b, x),
      "confidence": lambda x: metrics.confidence(x, y),
      "nontarget_variance": lambda x: metrics.nontarget_variance(x, y),
  }
  for name, fn in differentiable.items():
    value, grad = jax.jit(jax.value_and_grad(lambda x, fn=fn: jnp.sum(fn(x))))(a)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), name

  @jax.jit
  def others(a, b, y):
    return [metrics.rank_disagreement(a, b), metrics.agreement(a, b),
            metrics.logit_transform(metrics.confidence(a, y)),
            metrics.expected_calibration_error(a, y),
            metrics.class_rank_consistency(a, b, y, k=2),
            metrics.prediction_agreement(a, b, y), metrics.js_divergence(a, b)]

  values = others(a, b, y)
  assert all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(values))
  np.testing.assert_allclose(values[-1], np_per_example(np_js, a, b), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Class-rank consistency and attention IoU.


def test_class_rank_consistency_matches_scipy(rng):
  a, b = logits_pair(rng, (3, 4, 8))  # continuous: no ties
  b = b + 1.5 * a  # positively correlated rankings
  y = rng.integers(0, 8, size=(3, 4))
  k = 3
  got = jitted(metrics.class_rank_consistency, k=k)(a, b, y)

  def reference(ai, bi, yi, stat):
    an, bn = np.delete(ai, yi), np.delete(bi, yi)
    if stat == "spearman":
      return scipy.stats.spearmanr(an, bn).statistic
    if stat == "kendall":
      return scipy.stats.kendalltau(an, bn, variant="b").statistic
    return len(set(np.argsort(-an)[:k]) & set(np.argsort(-bn)[:k])) / k

  for stat in ("spearman", "kendall", "topk_overlap"):
    want = np_per_example(lambda ai, bi, yi: reference(ai, bi, yi, stat), a, b, y)
    assert got[stat].shape == (3, 4)
    np.testing.assert_allclose(got[stat], want, rtol=1e-5, atol=1e-6, err_msg=stat)


def test_class_rank_consistency_ties_match_scipy(rng):
  a = rng.integers(0, 4, size=(10, 7)).astype(np.float32)
  b = rng.integers(0, 4, size=(10, 7)).astype(np.float32)
  y = rng.integers(0, 7, size=10)
  got = jitted(metrics.class_rank_consistency, k=2)(a, b, y)
  for i in range(10):
    an, bn = np.delete(a[i], y[i]), np.delete(b[i], y[i])
    np.testing.assert_allclose(got["spearman"][i], scipy.stats.spearmanr(an, bn).statistic,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["kendall"][i], scipy.stats.kendalltau(an, bn).statistic,
                               rtol=1e-5, atol=1e-6)
  # A reversed ranking: rho = tau = -1; the target (largest logit here) is excluded.
  up = np.array([9.0, 1.0, 2.0, 3.0, 4.0], np.float32)
  down = np.array([9.0, 4.0, 3.0, 2.0, 1.0], np.float32)
  out = metrics.class_rank_consistency(up, down, np.array(0), k=2)
  np.testing.assert_allclose([out["spearman"], out["kendall"], out["topk_overlap"]],
                             [-1.0, -1.0, 0.0], atol=1e-6)


def test_attention_iou_matches_numpy(rng):
  map_a = rng.normal(size=(2, 3, 6, 5))
  map_b = map_a + rng.normal(scale=0.7, size=(2, 3, 6, 5))

  def np_iou(ma, mb, on):
    inter = np.logical_and(on(ma), on(mb)).sum()
    return inter / np.logical_or(on(ma), on(mb)).sum()

  for q in (0.5, 0.8):
    want = np.array([[np_iou(ma, mb, lambda m: m > np.quantile(m, q))
                      for ma, mb in zip(ra, rb)] for ra, rb in zip(map_a, map_b)])
    np.testing.assert_allclose(jitted(metrics.attention_iou, quantile=q)(map_a, map_b), want,
                               rtol=1e-6)
  minmax = lambda m: (m - m.min()) / (m.max() - m.min()) > 0.5
  want = np.array([[np_iou(ma, mb, minmax) for ma, mb in zip(ra, rb)]
                   for ra, rb in zip(map_a, map_b)])
  np.testing.assert_allclose(jitted(metrics.attention_iou, threshold=0.5)(map_a, map_b), want,
                             rtol=1e-6)
  # Identical maps -> 1; constant maps -> empty masks -> NaN (documented).
  np.testing.assert_allclose(metrics.attention_iou(map_a, map_a), 1.0)
  assert np.isnan(metrics.attention_iou(np.ones((4, 4)), np.ones((4, 4))))
  # The top half of 16 distinct pixels is on: disjoint halves give IoU 0, shared halves 1.
  ramp = np.arange(16.0).reshape(4, 4)
  np.testing.assert_allclose(metrics.attention_iou(ramp, -ramp), 0.0)
  np.testing.assert_allclose(metrics.attention_iou(ramp, 2 * ramp + 3), 1.0)


# ------------------------------------------------------------------------------------------------
# Dataset scalars.


def test_prediction_agreement_matches_numpy_and_identity(rng):
  s, t = logits_pair(rng, (3, 40, 4))
  y = rng.integers(0, 4, size=(3, 40))
  got = jitted(metrics.prediction_agreement)(s, t, y)
  a_s, a_t = s.argmax(-1), t.argmax(-1)
  want = {
      "agreement": np.mean(a_s == a_t),
      "agree_when_teacher_correct": np.mean((a_s == a_t)[a_t == y]),
      "agree_when_teacher_incorrect": np.mean((a_s == a_t)[a_t != y]),
      "both_correct": np.mean((a_s == y) & (a_t == y)),
      "both_incorrect_same": np.mean((a_s != y) & (a_t != y) & (a_s == a_t)),
      "count": 120, "teacher_correct_count": np.sum(a_t == y),
      "teacher_incorrect_count": np.sum(a_t != y),
  }
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(got["agreement"], got["both_correct"] + got["both_incorrect_same"],
                             rtol=1e-6)


def test_prediction_agreement_empty_condition_is_nan_without_warnings():
  t = np.eye(3, dtype=np.float32)
  y = np.arange(3)  # the teacher is always right
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = metrics.prediction_agreement(t[::-1], t, y)
    empty = metrics.prediction_agreement(t, t, y, mask=np.zeros(3))
  assert np.isnan(got["agree_when_teacher_incorrect"])
  np.testing.assert_allclose(got["agree_when_teacher_correct"], 1 / 3, rtol=1e-6)
  assert got["teacher_incorrect_count"] == 0
  assert all(np.isnan(empty[key]) for key in ("agreement", "both_correct"))


def test_mutual_information_closed_forms_and_sklearn(rng):
  c = 5
  uniform = np.repeat(np.arange(c), 7)
  np.testing.assert_allclose(metrics.mutual_information(uniform, uniform, c), math.log(c),
                             rtol=1e-6)
  # Every (i, j) pair exactly once: the empirical joint factorises, MI = 0.
  grid = np.arange(c * c)
  np.testing.assert_allclose(metrics.mutual_information(grid % c, grid // c, c), 0.0, atol=1e-6)
  a, b = rng.integers(0, c, size=(4, 500)), rng.integers(0, c, size=(4, 500))
  assert float(metrics.mutual_information(a, b, c)) < 0.02  # independent samples: ~0
  b = np.where(rng.random((4, 500)) < 0.6, a, b)
  np.testing.assert_allclose(metrics.mutual_information(a, b, c),
                             sklearn.metrics.mutual_info_score(a.ravel(), b.ravel()), rtol=1e-5)
  counts = metrics.joint_counts(a, b, c)
  np.testing.assert_array_equal(counts, sklearn.metrics.confusion_matrix(a.ravel(), b.ravel()))
  assert np.isnan(metrics.mutual_information(a, b, c, mask=np.zeros_like(a)))


def test_ece_matches_reference_and_calibrated_construction(rng):
  z = rng.normal(scale=3.0, size=(2, 150, 4)).astype(np.float32)
  y = rng.integers(0, 4, size=(2, 150))
  np.testing.assert_allclose(jitted(metrics.expected_calibration_error)(z, y), np_ece(z, y),
                             rtol=1e-5)
  np.testing.assert_allclose(jitted(metrics.expected_calibration_error, num_bins=7)(z, y),
                             np_ece(z, y, 7), rtol=1e-5)
  # Perfect calibration: in each group, the fraction correct equals the confidence.
  logits, labels = [], []
  for conf, n in ((0.6, 5), (0.75, 4), (0.9, 10)):
    for i in range(n):
      logits.append([math.log(conf), math.log(1 - conf)])
      labels.append(0 if i < round(conf * n) else 1)
  logits, labels = np.array(logits, np.float32), np.array(labels)
  ece = jitted(metrics.expected_calibration_error)
  np.testing.assert_allclose(ece(logits, labels), 0.0, atol=1e-6)
  # Always right at confidence 0.75: ECE = 0.25.
  np.testing.assert_allclose(ece(logits[5:9], np.zeros(4, int)), 0.25, rtol=1e-5)


def test_calibration_bins_are_right_closed():
  # conf = 0.5 exactly (two equal logits) sits on the edge of 2 bins: (0, 0.5] takes it.
  bins = metrics.calibration_bins(np.zeros((3, 2), np.float32), np.zeros(3, int), num_bins=2)
  np.testing.assert_array_equal(bins["count"], [3, 0])
  np.testing.assert_allclose(bins["confidence_sum"], [1.5, 0.0])
  np.testing.assert_array_equal(bins["correct_sum"], [3, 0])
  # conf = 1 (saturated logits) falls in the last bin (14/15, 1].
  bins = metrics.calibration_bins(np.array([[LARGE, 0.0]], np.float32), np.array([1]))
  assert bins["count"][-1] == 1 and bins["correct_sum"].sum() == 0


def test_masks_ignore_garbage_rows(rng):
  s, t = logits_pair(rng, (12, 5))
  y = rng.integers(0, 5, size=12)
  mask = np.array([1] * 9 + [0] * 3)
  s_bad, t_bad, y_bad = s.copy(), t.copy(), y.copy()
  s_bad[9:] = [np.nan, np.inf, -np.inf, 1e30, 0.0]
  t_bad[9:] = 1e30
  y_bad[9:] = [-1, 99, 5]
  keep = slice(0, 9)
  a_s, a_t = s[keep].argmax(-1), t[keep].argmax(-1)
  pairs = [
      (jitted(metrics.prediction_agreement)(s_bad, t_bad, y_bad, mask=mask),
       {"agreement": np.mean(a_s == a_t), "both_correct": np.mean((a_s == y[keep]) &
                                                                  (a_t == y[keep])),
        "count": 9}),
      (metrics.mutual_information(s_bad.argmax(-1), t_bad.argmax(-1), 5, mask=mask),
       sklearn.metrics.mutual_info_score(a_s, a_t)),
      (jitted(metrics.expected_calibration_error)(s_bad, y_bad, mask=mask),
       np_ece(s[keep], y[keep])),
      (jax.jit(metrics.SimilarityMetrics.from_batch)(s_bad, t_bad, y_bad, mask).compute(),
       np_similarity(s[keep], t[keep], y[keep])),
  ]
  for got, want in pairs:
    if isinstance(want, dict):
      for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Streaming accumulator.


def padded_batches(rng, s, t, y, sizes, pad_to):
  """Split into consecutive batches of `sizes`, each padded with garbage to `pad_to` rows."""
  start = 0
  for size in sizes:
    pad = pad_to - size
    garbage = rng.normal(scale=1e3, size=(pad, s.shape[-1])).astype(np.float32)
    garbage[:, 0] = np.nan
    yield (np.concatenate([s[start:start + size], garbage]),
           np.concatenate([t[start:start + size], garbage[:, ::-1]]),
           np.concatenate([y[start:start + size], np.full(pad, -1)]),
           np.concatenate([np.ones(size), np.zeros(pad)]))
    start += size


def test_similarity_metrics_streaming_equals_whole_set(rng):
  n, c = 37, 6
  s, t = logits_pair(rng, (n, c))
  t = t + s  # enough agreement for every conditional mean to be defined
  y = rng.integers(0, c, size=n)
  from_batch = jax.jit(metrics.SimilarityMetrics.from_batch)
  acc = metrics.SimilarityMetrics.empty()
  for batch in padded_batches(rng, s, t, y, sizes=(10, 16, 11), pad_to=16):
    acc = acc.merge(from_batch(*batch))
  got = acc.compute()
  want = np_similarity(s, t, y)
  assert set(got) == set(want)
  assert all(isinstance(v, float) for v in got.values())
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_similarity_metrics_vmap_over_replicas(rng):
  r, n, c = 3, 16, 4
  s = rng.normal(size=(r, n, c)).astype(np.float32)
  t = rng.normal(size=(r, n, c)).astype(np.float32)
  y = rng.integers(0, c, size=n)
  mask = (np.arange(n) < 13).astype(np.float32)
  batched = jax.jit(jax.vmap(metrics.SimilarityMetrics.from_batch, in_axes=(0, 0, None, None)))(
      s, t, y, mask)
  for i in range(r):
    got = jax.tree_util.tree_map(lambda x, i=i: x[i], batched).compute()
    want = np_similarity(s[i, :13], t[i, :13], y[:13])
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------------------------
# jit/vmap and validation.


def test_jit_vmap_equals_loop(rng):
  a, b = logits_pair(rng, (3, 4, 6))
  y = rng.integers(0, 6, size=(3, 4))
  maps_a, maps_b = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 4, 5, 5))
  cases = {
      "js": (lambda a, b, y, ma, mb: metrics.js_divergence(a, b)),
      "act": (lambda a, b, y, ma, mb: metrics.activation_distance(a, b)),
      "kl": (lambda a, b, y, ma, mb: metrics.kl_divergence(a, b)),
      "rank": (lambda a, b, y, ma, mb: metrics.rank_disagreement(a, b, k=3)),
      "nontarget_variance": (lambda a, b, y, ma, mb: metrics.nontarget_variance(a, y)),
      "kendall": (lambda a, b, y, ma, mb: metrics.class_rank_consistency(a, b, y)["kendall"]),
      "iou": (lambda a, b, y, ma, mb: metrics.attention_iou(ma, mb)),
      "ece": (lambda a, b, y, ma, mb: metrics.expected_calibration_error(a, y)),
  }
  for name, fn in cases.items():
    got = jax.jit(jax.vmap(fn))(a, b, y, maps_a, maps_b)
    single = jax.jit(fn)
    want = np.stack([single(a[i], b[i], y[i], maps_a[i], maps_b[i]) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_shape_mismatch_and_hyperparameter_errors():
  a, b = np.zeros((4, 5)), np.zeros((4, 6))
  y = np.zeros(4, int)
  for fn in (metrics.js_divergence, metrics.activation_distance, metrics.kl_divergence,
             metrics.rank_disagreement, metrics.agreement):
    with pytest.raises(ValueError, match=r"\(4, 5\) and \(4, 6\)"):
      fn(a, b)
  with pytest.raises(ValueError, match=r"\(4, 5\) and \(4, 6\)"):
    metrics.SimilarityMetrics.from_batch(a, b, y)
  with pytest.raises(ValueError, match=r"labels.*\(3,\)"):
    metrics.confidence(a, np.zeros(3, int))
  with pytest.raises(ValueError, match=r"mask.*\(4,\).*\(5,\)"):
    metrics.prediction_agreement(a, a, y, mask=np.ones(5))
  with pytest.raises(ValueError, match=r"map_a and map_b.*\(2, 3\) and \(3, 2\)"):
    metrics.attention_iou(np.zeros((2, 3)), np.zeros((3, 2)))
  bad_hyperparameters = [
      ("k", lambda: metrics.rank_disagreement(a, a, k=6)),
      ("k", lambda: metrics.rank_disagreement(a, a, k=2.0)),
      ("k", lambda: metrics.class_rank_consistency(a, a, y, k=5)),
      ("quantile", lambda: metrics.attention_iou(np.zeros((2, 2)), np.zeros((2, 2)), quantile=1)),
      ("threshold", lambda: metrics.attention_iou(np.zeros((2, 2)), np.zeros((2, 2)),
                                                  threshold=1.0)),
      ("num_classes", lambda: metrics.mutual_information(y, y, 0)),
      ("num_bins", lambda: metrics.expected_calibration_error(a, y, num_bins=0)),
  ]
  for name, call in bad_hyperparameters:
    with pytest.raises(ValueError, match=name):
      call()


def _np_topk_set_disagreement(a, b, k):
  """1 - |top-k(a) & top-k(b)| / k with numpy's stable argsort of -x (lowest index first)."""
  top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
  top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
  return 1.0 - len(top_a & top_b) / k


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_rank_disagreement_matches_set_overlap(rng, k):
  a = rng.normal(size=(30, 8)).astype(np.float32)
  b = (a + rng.normal(scale=0.5, size=(30, 8))).astype(np.float32)
  b[:5] = rng.integers(0, 2, size=(5, 8))  # ties
  got = metrics.topk_rank_disagreement(a, b, k=k)
  want = [_np_topk_set_disagreement(x, y, k) for x, y in zip(a, b)]
  np.testing.assert_allclose(got, want, atol=1e-7)
  if k == 1:
    np.testing.assert_allclose(got, 1.0 - metrics.agreement(a, b), atol=1e-7)
  with pytest.raises(ValueError, match="k must"):
    metrics.topk_rank_disagreement(a, b, k=9)


def test_full_rank_disagreement_saturates_with_many_classes_and_topk_does_not(rng):
  """100 classes, rankings with Spearman correlation > 0.99 (scipy): the full positional rank
  disagreement is near 1, the top-5 set disagreement small; the docstrings' guidance."""
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  a = rng.normal(0, 3, size=(50, 100)).astype(np.float32)
  a[:, 0] += 12.0  # a confident top class, as a trained model's
  b = (a + rng.normal(0, 0.2, size=a.shape)).astype(np.float32)
  rho = np.mean([scipy_stats.spearmanr(x, y)[0] for x, y in zip(a, b)])
  assert rho > 0.99
  full = np.mean([np_rank_disagreement(x, y) for x, y in zip(a, b)])
  top5 = np.mean([_np_topk_set_disagreement(x, y, 5) for x, y in zip(a, b)])
  assert full > 0.6 and top5 < 0.2
  np.testing.assert_allclose(np.mean(np.asarray(metrics.rank_disagreement(a, b))), full,
                             atol=1e-6)
  np.testing.assert_allclose(np.mean(np.asarray(metrics.topk_rank_disagreement(a, b, k=5))),
                             top5, atol=1e-6)
