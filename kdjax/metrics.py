"""Functional-similarity metrics between a student and its teacher: pure functions and a streaming
accumulator, importable on their own.

Conventions (all functions):
  * class axis last, any leading axes (batch, replica);
  * per-example functions return `logits.shape[:-1]`, no reduction; the functions documented as
    "dataset scalars" reduce over all leading axes themselves, with an optional `mask`;
  * softmax at T = 1, natural logs (nats), as in docs/design.md "Public contracts";
  * `mask`: an array of shape `logits.shape[:-1]`; nonzero entries count, zero entries (padding
    of an eval batch) are ignored even when their logits/labels are garbage (NaN, inf, -1);
  * Python-number arguments (`k`, `num_classes`, `num_bins`, `quantile`, ...) are validated
    eagerly with a ValueError and must be static under jit;
  * numerically stable: probabilities come from `log_softmax`; logits of magnitude 1e4 give finite
    values (and finite gradients for the differentiable metrics). Inputs are computed in at least
    float32.

Notation: s = student logits, t = teacher logits, y = label, C = number of classes,
p = softmax(a), q = softmax(b), KL(p || q) = sum_k p_k (log p_k - log q_k).

Streaming: `SimilarityMetrics.from_batch(s, t, y, mask)` (jit/vmap-able) per padded eval batch,
`.merge(...)` across batches, `.compute()` -> the docs/design.md dataset metrics as Python floats.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import losses

# The public functions and classes (constants and type aliases stay importable by name).
__all__ = [
    "js_divergence",
    "activation_distance",
    "kl_divergence",
    "agreement",
    "rank_disagreement",
    "topk_rank_disagreement",
    "confidence",
    "logit_transform",
    "nontarget_variance",
    "class_rank_consistency",
    "attention_iou",
    "prediction_agreement",
    "joint_counts",
    "mutual_information_from_counts",
    "mutual_information",
    "calibration_bins",
    "ece_from_bins",
    "expected_calibration_error",
    "SimilarityMetrics",
]

Array = jax.Array

# The number of confidence bins of `ece` (docs/design.md) (Guo et al. 2017 use 15).
ECE_NUM_BINS = 15


def _as_float(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _log_probs(logits) -> Array:
  return jax.nn.log_softmax(_as_float(logits), axis=-1)


def _check_pair(name_a: str, a, name_b: str, b) -> None:
  _checks.check_same_shape(name_a, a, name_b, b)
  if np.ndim(a) < 1:
    raise ValueError(f"{name_a} needs a class axis (last), got a scalar")


def _mask_or_ones(mask, shape) -> Array:
  """The mask as bool of `shape` (all True when None)."""
  if mask is None:
    return jnp.ones(shape, bool)
  if tuple(np.shape(mask)) != tuple(shape):
    raise ValueError(f"mask must have shape {tuple(shape)} (the leading axes), got "
                     f"{tuple(np.shape(mask))}")
  return jnp.asarray(mask) != 0


def _safe_divide(numerator, denominator) -> Array:
  """numerator / denominator, NaN where denominator == 0 (no inf, no warning, no NaN gradient)."""
  ok = denominator > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), jnp.nan)


def _xlogy_sum(log_p: Array, log_q: Array) -> Array:
  """sum_k p_k (log p_k - log q_k) with the convention 0 * log 0 = 0, p = exp(log_p).

  Zero probabilities appear as log_p = -inf (an -inf logit); the terms are replaced before the
  subtraction so neither the value nor the gradient sees -inf - -inf.
  """
  nonzero = log_p > -jnp.inf
  diff = jnp.where(nonzero, log_p, 0.0) - jnp.where(nonzero, log_q, 0.0)
  return jnp.sum(jnp.where(nonzero, jnp.exp(log_p) * diff, 0.0), axis=-1)


# ------------------------------------------------------------------------------------------------
# Per-example metrics.


def js_divergence(a_logits, b_logits) -> Array:
  """Jensen-Shannon divergence between softmax(a) and softmax(b), per example, in nats:

    JS(p, q) = 0.5 KL(p || m) + 0.5 KL(q || m),   m = (p + q) / 2,   0 <= JS <= log 2.

  One of the functional-similarity measures of Mason-Williams et al. (arXiv 2510.12615).
  log m = logaddexp(log p, log q) - log 2 is computed in log space, so underflowed (1e4 logits)
  and exactly-zero (-inf logit) probabilities give finite values and finite gradients with
  respect to the finite logits; the result is clipped to [0, log 2] against rounding.

  Args:
    a_logits: [..., C] logits.
    b_logits: [..., C] logits, same shape.

  Returns:
    JS in nats, shape `a_logits.shape[:-1]`.
  """
  _check_pair("a_logits", a_logits, "b_logits", b_logits)
  log_p, log_q = _log_probs(a_logits), _log_probs(b_logits)
  # A class with p = q = 0 has no term; logaddexp(-inf, -inf) would make its gradient NaN.
  both_zero = (log_p == -jnp.inf) & (log_q == -jnp.inf)
  log_m = jnp.logaddexp(jnp.where(both_zero, 0.0, log_p),
                        jnp.where(both_zero, 0.0, log_q)) - jnp.log(2.0)
  js = 0.5 * _xlogy_sum(log_p, log_m) + 0.5 * _xlogy_sum(log_q, log_m)
  return jnp.clip(js, 0.0, jnp.log(2.0))


def activation_distance(a_logits, b_logits) -> Array:
  """Activation distance ||softmax(a) - softmax(b)||_2 per example (arXiv 2510.12615),
  between 0 and sqrt(2) (two different one-hot distributions).

  The square root is guarded so the gradient at a == b is 0, not NaN.

  Args:
    a_logits: [..., C] logits.
    b_logits: [..., C] logits, same shape.

  Returns:
    The distance, shape `a_logits.shape[:-1]`.
  """
  _check_pair("a_logits", a_logits, "b_logits", b_logits)
  diff = jnp.exp(_log_probs(a_logits)) - jnp.exp(_log_probs(b_logits))
  squared = jnp.sum(jnp.square(diff), axis=-1)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def kl_divergence(target_logits, logits) -> Array:
  """KL(softmax(target) || softmax(logits)) per example, in nats:

    KL(p_t || p_s) = sum_k p_t,k (log p_t,k - log p_s,k).

  kdjax's `kl_divergence` metric is KL(p_t || p_s) with target = teacher, logits = student, at
  T = 1, per example of the un-augmented eval split, averaged over the split. It is a fidelity
  measure in the sense of arXiv 2405.00739 but not the number that paper reports: its authors'
  code (zisci2/RethinkKD, trainer.py `KL_divergence`) computes 10 x KL(p_s || p_t) (the other
  direction: `F.kl_div(log p_t, p_s)`), averaged per batch (`batchmean`) over the training
  batches with their augmentation, and sums the batch values over an epoch. So kdjax's value is
  neither scaled by 10 nor of the same direction, and is measured on held-out, un-augmented
  data; compare it across arms within kdjax, not with the paper's numbers. Defined as the T = 1
  case of `kdjax.losses.kl_divergence` (Hinton et al. 2015, arXiv 1503.02531) so there is one
  implementation of the KL.

  Args:
    target_logits: [..., C] logits of the target distribution (the teacher).
    logits: [..., C] logits of the fitted distribution (the student), same shape.

  Returns:
    The KL in nats, shape `logits.shape[:-1]`.
  """
  return losses.kl_divergence(target_logits, logits, temperature=1.0)


def agreement(a_logits, b_logits) -> Array:
  """Top-1 agreement [argmax a == argmax b] as float32 per example (arXiv 2510.12615,
  2405.00739). Ties in argmax go to the lowest class index, as `jnp.argmax`.

  Args:
    a_logits: [..., C] logits.
    b_logits: [..., C] logits, same shape.

  Returns:
    1.0 where the top-1 classes agree, else 0.0; shape `a_logits.shape[:-1]`.
  """
  _check_pair("a_logits", a_logits, "b_logits", b_logits)
  a, b = jnp.asarray(a_logits), jnp.asarray(b_logits)
  return (jnp.argmax(a, -1) == jnp.argmax(b, -1)).astype(jnp.float32)


def _descending_order(logits) -> Array:
  """Class indices sorted by decreasing logit; ties keep the lowest class index first (stable)."""
  return jnp.argsort(jnp.asarray(logits), axis=-1, descending=True, stable=True)


def rank_disagreement(a_logits, b_logits, *, k: int | None = None) -> Array:
  """Rank disagreement per example (Mason-Williams et al., arXiv 2510.12615):

    RD = (1/K) sum_{r=1..K} [pi_a(r) != pi_b(r)],   K = C (default) or k,

  where pi_x(r) is the class at rank r when the classes are sorted by decreasing logit of x. Ties
  are broken stably: among equal logits the lowest class index ranks first. softmax is monotone,
  so ranking logits equals ranking probabilities. `k` in [1, C] restricts to the top-k positions.

  When it is informative: with few classes (C <= ~10: digits, CIFAR-10), where a swap of two
  positions is a real difference in how the classes are ranked. With many classes it saturates:
  any swap in the long, near-tied tail of low-probability classes counts, so two rankings with
  Spearman correlation 0.993 over 100 classes disagree at 80% of the positions. There use
  `topk_rank_disagreement` (which classes the top k are) or this function with `k` (at which of
  the first k positions the classes differ).

  Args:
    a_logits: [..., C] logits.
    b_logits: [..., C] logits, same shape.
    k: None (all C positions) or the number of leading positions compared, in [1, C].

  Returns:
    RD in [0, 1], shape `a_logits.shape[:-1]`.
  """
  _check_pair("a_logits", a_logits, "b_logits", b_logits)
  num_classes = np.shape(a_logits)[-1]
  if k is None:
    k = num_classes
  _checks.check_int("k", k, low=1, high=num_classes)
  order_a = _descending_order(a_logits)[..., :k]
  order_b = _descending_order(b_logits)[..., :k]
  return jnp.mean((order_a != order_b).astype(jnp.float32), axis=-1)


def topk_rank_disagreement(a_logits, b_logits, *, k: int = 5) -> Array:
  """Top-k set disagreement per example, the top-k variant of `rank_disagreement`:

    RD@k = 1 - |top_k(a) & top_k(b)| / k,

  the fraction of a's k highest-ranked classes that are not among b's k highest-ranked classes
  (order within the top k ignored; ties broken as in `rank_disagreement`). The complement of
  the top-k rank-set overlap of arXiv 2405.13078's class-affinity consistency. Informative with
  many classes, where the full-ranking `rank_disagreement` saturates: it looks only at the
  classes a model considers most likely, where dark knowledge lives. `k` in [1, C] (k = 1 is
  1 - top-1 agreement).

  Args:
    a_logits: [..., C] logits.
    b_logits: [..., C] logits, same shape.
    k: the set size, in [1, C].

  Returns:
    RD@k in [0, 1], shape `a_logits.shape[:-1]`.
  """
  _check_pair("a_logits", a_logits, "b_logits", b_logits)
  num_classes = np.shape(a_logits)[-1]
  _checks.check_int("k", k, low=1, high=num_classes)
  top_a = _descending_order(a_logits)[..., :k]
  top_b = _descending_order(b_logits)[..., :k]
  shared = jnp.sum(top_a[..., :, None] == top_b[..., None, :], axis=(-2, -1))
  return 1.0 - shared.astype(jnp.float32) / k


def confidence(logits, labels) -> Array:
  """Probability of the true class, softmax(logits)[label], per example.

  The quantity whose teacher-vs-student scatter (after `logit_transform`) is Fig. 1 of Nagarajan
  et al. (arXiv 2301.12923). Labels must lie in [0, C).

  Args:
    logits: [..., C] logits.
    labels: integer labels of shape `logits.shape[:-1]`, in [0, C).

  Returns:
    softmax(logits)[label], shape `logits.shape[:-1]`.
  """
  _checks.check_labels_shape("logits", logits, "labels", labels)
  log_p = _log_probs(logits)
  return jnp.exp(jnp.take_along_axis(log_p, jnp.asarray(labels)[..., None], axis=-1)[..., 0])


def logit_transform(p, *, eps: float = 1e-6) -> Array:
  """Elementwise logit of a probability, clipped to the logit of [eps, 1 - eps]:

    logit(p) = clip(log p - log(1 - p), -L, L),   L = log((1 - eps) / eps)

  (L is about 13.8 at the default eps), so p in {0, 1} stays finite. The axis transform of the
  confidence scatter in arXiv 2301.12923, Fig. 1. Clipping the log-odds rather than p keeps the
  two ends symmetric: in float32, 1 - eps is not representable to better than ~6e-8.
  `eps` in (0, 0.5); the result has the shape of `p`.

  Args:
    p: probabilities, any shape.
    eps: the clipping level, in (0, 0.5).

  Returns:
    The clipped log-odds, shape `p.shape`.
  """
  _checks.check_range("eps", eps, low=0.0, high=0.5, low_inclusive=False, high_inclusive=False)
  p = _as_float(p)
  finfo = jnp.finfo(p.dtype)
  # Keeps log and log1p finite (value and gradient) before the final clip.
  p = jnp.clip(p, finfo.tiny, 1.0 - finfo.epsneg)
  bound = math.log((1.0 - eps) / eps)
  return jnp.clip(jnp.log(p) - jnp.log1p(-p), -bound, bound)


def nontarget_variance(logits, labels) -> Array:
  """Variance of the non-target probabilities per example (arXiv 2405.13078: larger teachers have
  lower non-target variance):

    v = (1 / (C - 1)) sum_{k != y} (p_k - mu)^2,   mu = (1 / (C - 1)) sum_{k != y} p_k,

  with p = softmax over all C classes (the target is removed, the rest is not renormalised) and
  the population variance over the C - 1 entries. Needs C >= 2. ISATS maximises the same
  variance of the teacher's asymmetric-temperature distribution (`kdjax.losses.isats_temperature`;
  equal to this one when both temperatures are 1), so it shares that implementation.

  Args:
    logits: [..., C] logits, C >= 2.
    labels: integer labels of shape `logits.shape[:-1]`.

  Returns:
    v, shape `logits.shape[:-1]`.
  """
  _checks.check_labels_shape("logits", logits, "labels", labels)
  if np.shape(logits)[-1] < 2:
    raise ValueError(f"nontarget_variance needs at least 2 classes, got logits shape "
                     f"{tuple(np.shape(logits))}")
  probs = jnp.exp(_log_probs(logits))
  # pylint: disable-next=protected-access
  return losses._nontarget_probability_variance(probs, jnp.asarray(labels))


# ------------------------------------------------------------------------------------------------
# Class-affinity ranks and attention maps.


def _average_ranks(x: Array, valid: Array) -> Array:
  """1-based ranks of x along the last axis among the `valid` entries, ties get their average rank
  (as scipy.stats.rankdata 'average'). Pairwise, O(C^2) per example."""
  xi, xj = x[..., :, None], x[..., None, :]
  vj = valid[..., None, :]
  less = jnp.sum(jnp.where(vj & (xj < xi), 1.0, 0.0), axis=-1)
  equal = jnp.sum(jnp.where(vj & (xj == xi), 1.0, 0.0), axis=-1)  # includes the entry itself
  return less + (equal + 1.0) / 2.0


def _weighted_pearson(x: Array, y: Array, valid: Array) -> Array:
  w = valid.astype(x.dtype)
  n = jnp.sum(w, axis=-1, keepdims=True)
  xc = (x - jnp.sum(w * x, -1, keepdims=True) / n) * w
  yc = (y - jnp.sum(w * y, -1, keepdims=True) / n) * w
  return _safe_divide(jnp.sum(xc * yc, -1),
                      jnp.sqrt(jnp.sum(xc * xc, -1) * jnp.sum(yc * yc, -1)))


def class_rank_consistency(a_logits, b_logits, labels, *, k: int = 5) -> dict[str, Array]:
  """Agreement of two models' class-affinity rankings over the NON-TARGET classes, per example
  (arXiv 2405.13078: teachers of different capacity rank the non-target classes alike).

  With a', b' the C - 1 non-target logits of an example (softmax is monotone, so ranking logits
  equals ranking probabilities):
    spearman     = Pearson correlation of the ranks of a' and b' (ties: average ranks), as
                   scipy.stats.spearmanr;
    kendall      = Kendall tau-b = sum_{i<j} sgn(a'_i - a'_j) sgn(b'_i - b'_j)
                   / sqrt((n0 - n_a)(n0 - n_b)), n0 = (C-1)(C-2)/2, n_a / n_b the pairs tied in
                   a' / b'; equals tau-a without ties; as scipy.stats.kendalltau (variant 'b');
    topk_overlap = |top-k(a') intersect top-k(b')| / k, the top-k rank-set overlap (lax.top_k:
                   equal logits -> lowest class index first).
  spearman/kendall are NaN where one ranking is constant (as scipy). Needs C >= 3 and
  1 <= k <= C - 1. Memory is O(C^2) per example (pairwise comparisons): chunk the batch for
  large C. Returns {"spearman", "kendall", "topk_overlap"}, each of shape `labels.shape`.

  Args:
    a_logits: [..., C] logits, C >= 3.
    b_logits: [..., C] logits, same shape.
    labels: integer labels of shape `a_logits.shape[:-1]` (the target class left out).
    k: the top-k set size, in [1, C - 1].

  Returns:
    {"spearman", "kendall", "topk_overlap"}, each of shape `labels.shape`.
  """
  _check_pair("a_logits", a_logits, "b_logits", b_logits)
  _checks.check_labels_shape("a_logits", a_logits, "labels", labels)
  num_classes = np.shape(a_logits)[-1]
  if num_classes < 3:
    raise ValueError(f"class_rank_consistency needs at least 3 classes, got a_logits shape "
                     f"{tuple(np.shape(a_logits))}")
  _checks.check_int("k", k, low=1, high=num_classes - 1)
  a, b = _as_float(a_logits), _as_float(b_logits)
  nontarget = ~jax.nn.one_hot(labels, num_classes, dtype=bool)

  spearman = _weighted_pearson(_average_ranks(a, nontarget), _average_ranks(b, nontarget),
                               nontarget)

  pair_valid = nontarget[..., :, None] & nontarget[..., None, :]
  sign_a = jnp.where(pair_valid, jnp.sign(a[..., :, None] - a[..., None, :]), 0.0)
  sign_b = jnp.where(pair_valid, jnp.sign(b[..., :, None] - b[..., None, :]), 0.0)
  # Sums over all ordered pairs (i, j) count each unordered pair twice; the ratio is unchanged.
  concordance = jnp.sum(sign_a * sign_b, axis=(-2, -1))
  untied_a = jnp.sum(jnp.abs(sign_a), axis=(-2, -1))
  untied_b = jnp.sum(jnp.abs(sign_b), axis=(-2, -1))
  kendall = _safe_divide(concordance, jnp.sqrt(untied_a * untied_b))

  def top_k_members(x):
    # The target ranks below every non-target class, so it is never among the k <= C - 1 picked.
    x = jnp.where(nontarget, x, -jnp.inf)
    _, idx = jax.lax.top_k(x, k)
    return jnp.sum(jax.nn.one_hot(idx, num_classes), axis=-2)

  topk_overlap = jnp.sum(top_k_members(a) * top_k_members(b), axis=-1) / k
  return {"spearman": spearman, "kendall": kendall, "topk_overlap": topk_overlap}


def attention_iou(map_a, map_b, *, quantile: float = 0.5,
                  threshold: float | None = None) -> Array:
  """Intersection over union of two binarised attention maps, per example (arXiv 2405.00739:
  stronger augmentation lowers the attention IoU between teachers). Maps are [..., H, W].

  Binarisation of each map on its own, per example:
    default (`threshold=None`): pixel on iff value > the map's `quantile` (linear interpolation,
      as numpy.quantile), i.e. the top (1 - quantile) fraction of pixels is on;
    `threshold=tau`: pixel on iff (value - min) / (max - min) > tau, the rule of the authors'
      released code (github.com/zisci2/RethinkKD, IoU/calculate-IoU.py: class-summed CAMs,
      bilinearly upsampled to the image size, min-max normalised, tau = 0.5); `quantile` is then
      unused.
    IoU = |A and B| / |A or B| over the two spatial axes; NaN when both maps are empty (constant
    maps).
  The authors report a batch-pooled IoU (sum of intersections / sum of unions within a batch,
  averaged over batches); this function returns per-example values, which the caller averages.
  Computing and resizing the maps (CAM, Grad-CAM, ...) is the caller's job. `quantile` in (0, 1),
  `threshold` in [0, 1).

  Args:
    map_a: [..., H, W] attention maps.
    map_b: [..., H, W] attention maps, same shape.
    quantile: the per-map quantile above which a pixel is on, in (0, 1).
    threshold: None, or the min-max-normalised level in [0, 1) above which a pixel is on.

  Returns:
    The IoU, shape `map_a.shape[:-2]`.
  """
  _checks.check_same_shape("map_a", map_a, "map_b", map_b)
  if np.ndim(map_a) < 2:
    raise ValueError(f"attention maps must be [..., H, W], got shape {tuple(np.shape(map_a))}")
  _checks.check_range("quantile", quantile, low=0.0, high=1.0, low_inclusive=False,
                      high_inclusive=False)
  if threshold is not None:
    _checks.check_range("threshold", threshold, low=0.0, high=1.0, high_inclusive=False)

  def binarise(m):
    m = _as_float(m)
    if threshold is None:
      return m > jnp.quantile(m, quantile, axis=(-2, -1), keepdims=True)
    low = jnp.min(m, axis=(-2, -1), keepdims=True)
    high = jnp.max(m, axis=(-2, -1), keepdims=True)
    return (m - low) > threshold * (high - low)

  on_a, on_b = binarise(map_a), binarise(map_b)
  intersection = jnp.sum(on_a & on_b, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.sum(on_a | on_b, axis=(-2, -1)).astype(jnp.float32)
  return _safe_divide(intersection, union)


# ------------------------------------------------------------------------------------------------
# Dataset scalars.


def prediction_agreement(student_logits, teacher_logits, labels, *, mask=None) -> dict[str, Array]:
  """Top-1 prediction agreement split by the teacher's correctness (arXiv 2510.12615), reduced
  over all leading axes (dataset scalars). With s = argmax student, t = argmax teacher and means
  over the examples with a nonzero `mask`:

    agreement                    = mean [s = t]
    agree_when_teacher_correct   = mean [s = t] over examples with t = y
    agree_when_teacher_incorrect = mean [s = t] over examples with t != y
    both_correct                 = mean [s = y and t = y]
    both_incorrect_same          = mean [s != y and t != y and s = t]
  (agreement = both_correct + both_incorrect_same). A conditional mean over an empty set (the
  teacher is never wrong, or mask all zero) is NaN, not a division warning. The counts
  `count`, `teacher_correct_count`, `teacher_incorrect_count` are returned too (float32), so a
  streaming caller can recombine batches exactly: numerator = mean * count.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits, same shape.
    labels: integer labels of shape `student_logits.shape[:-1]`.
    mask: optional, shape `labels.shape`; zero entries are ignored.

  Returns:
    A dict of float32 scalars: the five means above and the three counts.
  """
  _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
  _checks.check_labels_shape("student_logits", student_logits, "labels", labels)
  keep = _mask_or_ones(mask, np.shape(labels))
  s = jnp.argmax(jnp.asarray(student_logits), -1)
  t = jnp.argmax(jnp.asarray(teacher_logits), -1)
  y = jnp.asarray(labels)
  agree, teacher_correct = s == t, t == y

  def count(condition):
    return jnp.sum(keep & condition, dtype=jnp.float32)

  n = count(True)
  n_tc, n_ti = count(teacher_correct), count(~teacher_correct)
  return {
      "agreement": _safe_divide(count(agree), n),
      "agree_when_teacher_correct": _safe_divide(count(agree & teacher_correct), n_tc),
      "agree_when_teacher_incorrect": _safe_divide(count(agree & ~teacher_correct), n_ti),
      "both_correct": _safe_divide(count((s == y) & teacher_correct), n),
      "both_incorrect_same": _safe_divide(count(agree & ~teacher_correct), n),
      "count": n,
      "teacher_correct_count": n_tc,
      "teacher_incorrect_count": n_ti,
  }


def joint_counts(a_pred, b_pred, num_classes: int, *, mask=None) -> Array:
  """The [num_classes, num_classes] contingency table N_ij = #{n : a_n = i, b_n = j} of two
  integer prediction arrays over all their axes (masked entries excluded), as float32 (exact up
  to 2^24 per cell). Predictions outside [0, num_classes) are not counted.

  Args:
    a_pred: integer predictions, any shape.
    b_pred: integer predictions, same shape.
    num_classes: the table's size, an integer >= 1.
    mask: optional, shape `a_pred.shape`; zero entries are not counted.

  Returns:
    N, float32 [num_classes, num_classes].
  """
  _checks.check_same_shape("a_pred", a_pred, "b_pred", b_pred)
  _checks.check_int("num_classes", num_classes, low=1)
  keep = _mask_or_ones(mask, np.shape(a_pred)).reshape(-1)
  one_hot_a = jax.nn.one_hot(jnp.reshape(a_pred, -1), num_classes) * keep[:, None]
  one_hot_b = jax.nn.one_hot(jnp.reshape(b_pred, -1), num_classes)
  return one_hot_a.T @ one_hot_b


def mutual_information_from_counts(counts) -> Array:
  """Plug-in mutual information (nats) of a contingency table N [..., I, J]:

    MI = sum_ij P_ij (log P_ij - log P_i. - log P_.j),   P = N / sum N,   0 log 0 = 0.

  NaN for an all-zero table; clipped at 0 against rounding (the plug-in MI is a KL divergence).

  Args:
    counts: a contingency table [..., I, J] of non-negative counts.

  Returns:
    MI in nats, shape `counts.shape[:-2]`.
  """
  counts = _as_float(counts)
  total = jnp.sum(counts, axis=(-2, -1), keepdims=True)
  p = counts / jnp.where(total > 0, total, 1.0)
  log_p = jnp.log(jnp.where(p > 0, p, 1.0))
  row = jnp.sum(p, axis=-1, keepdims=True)
  col = jnp.sum(p, axis=-2, keepdims=True)
  log_row = jnp.log(jnp.where(row > 0, row, 1.0))
  log_col = jnp.log(jnp.where(col > 0, col, 1.0))
  mi = jnp.sum(jnp.where(p > 0, p * (log_p - log_row - log_col), 0.0), axis=(-2, -1))
  return jnp.where(total[..., 0, 0] > 0, jnp.maximum(mi, 0.0), jnp.nan)


def mutual_information(a_pred, b_pred, num_classes: int, *, mask=None) -> Array:
  """Mutual information in nats between two integer prediction arrays, from their empirical joint
  distribution over all axes (the plug-in estimator, 0 log 0 = 0; dataset scalar):

    MI(A; B) = sum_ij P_ij log(P_ij / (P_i. P_.j)),   P_ij = #{n : a_n = i, b_n = j} / N.

  arXiv 2405.00739 relates student-teacher MI of predictions to generalisation; docs/design.md's
  `mutual_information` is MI(argmax s; argmax t). Equals sklearn.metrics.mutual_info_score.
  MI = log C for identical uniform predictions over C classes and 0 for independent ones.

  Args:
    a_pred: integer predictions, any shape.
    b_pred: integer predictions, same shape.
    num_classes: the number of classes, an integer >= 1.
    mask: optional, shape `a_pred.shape`; zero entries are ignored.

  Returns:
    MI in nats, a scalar.
  """
  return mutual_information_from_counts(joint_counts(a_pred, b_pred, num_classes, mask=mask))


def calibration_bins(logits, labels, *, num_bins: int = ECE_NUM_BINS,
                     mask=None) -> dict[str, Array]:
  """Per-bin sums for reliability diagrams and ECE (Guo et al. 2017, "On Calibration of Modern
  Neural Networks", arXiv 1706.04599), over all leading axes:

    count[b], confidence_sum[b], correct_sum[b]   for the examples whose confidence
    conf = max_k softmax(logits)_k lies in bin b = ((b - 1)/B, b/B],  b = 1..B,

  right-closed equal-width bins (as Guo et al.'s and most reference code: lower < conf <= upper);
  correct = [argmax logits = label]. Each has shape [num_bins], float32.

  Args:
    logits: [..., C] logits.
    labels: integer labels of shape `logits.shape[:-1]`.
    num_bins: B, an integer >= 1.
    mask: optional, shape `labels.shape`; zero entries are ignored.

  Returns:
    {"count", "confidence_sum", "correct_sum"}, each float32 [num_bins].
  """
  _checks.check_labels_shape("logits", logits, "labels", labels)
  _checks.check_int("num_bins", num_bins, low=1)
  keep = _mask_or_ones(mask, np.shape(labels))
  log_p = _log_probs(logits)
  conf = jnp.exp(jnp.max(log_p, axis=-1))
  correct = jnp.argmax(log_p, axis=-1) == jnp.asarray(labels)
  # Bin index = number of interior edges strictly below conf, i.e. right-closed bins.
  inner_edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=jnp.float32)[1:-1]
  bin_index = jnp.searchsorted(inner_edges, conf, side="left")
  member = jax.nn.one_hot(bin_index, num_bins, dtype=bool) & keep[..., None]
  axes = tuple(range(member.ndim - 1))

  def per_bin(values):
    return jnp.sum(jnp.where(member, values[..., None], 0.0), axis=axes, dtype=jnp.float32)

  return {"count": per_bin(jnp.ones_like(conf)), "confidence_sum": per_bin(conf),
          "correct_sum": per_bin(correct.astype(jnp.float32))}


def ece_from_bins(count, confidence_sum, correct_sum) -> Array:
  """ECE from per-bin sums: sum_b |B_b|/N |acc(B_b) - conf(B_b)| = sum_b |correct_b - conf_b| / N.
  NaN when N = 0.

  Args:
    count: [B] examples per bin.
    confidence_sum: [B] sums of the confidences per bin.
    correct_sum: [B] numbers of correct predictions per bin.

  Returns:
    The ECE, a scalar.
  """
  total = jnp.sum(count, axis=-1)
  return _safe_divide(jnp.sum(jnp.abs(correct_sum - confidence_sum), axis=-1), total)


def expected_calibration_error(logits, labels, *, num_bins: int = ECE_NUM_BINS,
                               mask=None) -> Array:
  """Expected calibration error (Guo et al. 2017, arXiv 1706.04599; dataset scalar):

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|,

  with confidence = max softmax probability, `num_bins` right-closed equal-width bins on (0, 1]
  ((0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]; see `calibration_bins`), N = number of unmasked
  examples. NaN when N = 0.

  Args:
    logits: [..., C] logits.
    labels: integer labels of shape `logits.shape[:-1]`.
    num_bins: B, an integer >= 1.
    mask: optional, shape `labels.shape`; zero entries are ignored.

  Returns:
    The ECE in [0, 1], a scalar.
  """
  return ece_from_bins(**calibration_bins(logits, labels, num_bins=num_bins, mask=mask))


# ------------------------------------------------------------------------------------------------
# Streaming accumulator: per-batch states of sums and counts, merged by addition (the design of
# clu.metrics, written out here so that kdjax does not need clu).
#
# SimilarityMetrics reads its metric classes from `__annotations__`, which
# `from __future__ import annotations` turns into strings; it therefore sets `__annotations__`
# explicitly.


@flax.struct.dataclass
class _Average:
  """Sum and count of the kept per-example values of a batch; computes their mean (NaN if none).

  Subclasses made by `_per_example_average` define `from_model_output`."""
  total: Array
  count: Array

  @classmethod
  def empty(cls) -> _Average:
    return cls(total=jnp.array(0, jnp.float32), count=jnp.array(0, jnp.int32))

  @classmethod
  def from_values(cls, values, keep) -> _Average:
    """values [N], keep [N] bool: total = sum of the kept values, count = their number."""
    return cls(total=jnp.where(keep, values, jnp.zeros_like(values)).sum(),
               count=jnp.where(keep, jnp.ones_like(values, dtype=jnp.int32),
                               jnp.zeros_like(values, dtype=jnp.int32)).sum())

  def merge(self, other: _Average) -> _Average:
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> Array:
    return self.total / self.count


def _per_example_average(values_fn, condition_fn=None) -> type[_Average]:
  """An _Average over the unmasked (and `condition_fn`-true) examples of a flattened batch."""

  @flax.struct.dataclass
  class PerExampleAverage(_Average):

    @classmethod
    def from_model_output(cls, *, student_logits, teacher_logits, labels, mask, **_):
      keep = mask.astype(bool)
      if condition_fn is not None:
        keep = keep & condition_fn(student_logits, teacher_logits, labels)
      return cls.from_values(values_fn(student_logits, teacher_logits, labels), keep)

  return PerExampleAverage


def _top1(logits) -> Array:
  return jnp.argmax(logits, axis=-1)


@flax.struct.dataclass
class _JointCounts:
  """C x C joint counts of (argmax s, argmax t); computes their mutual information.

  `empty()` is a scalar 0 (C is unknown until a batch arrives); merging broadcasts it.
  """
  counts: Array

  @classmethod
  def empty(cls) -> _JointCounts:
    return cls(counts=jnp.zeros((), jnp.float32))

  @classmethod
  def from_model_output(cls, *, student_logits, teacher_logits, mask, **_) -> _JointCounts:
    return cls(counts=joint_counts(_top1(student_logits), _top1(teacher_logits),
                                   student_logits.shape[-1], mask=mask))

  def merge(self, other: _JointCounts) -> _JointCounts:
    return type(self)(counts=self.counts + other.counts)

  def compute(self) -> Array:
    if self.counts.ndim < 2:
      return jnp.array(jnp.nan, jnp.float32)
    return mutual_information_from_counts(self.counts)


@flax.struct.dataclass
class _CalibrationBins:
  """Per-bin count / confidence sum / correct sum of the student; computes the ECE."""
  count: Array
  confidence_sum: Array
  correct_sum: Array

  @classmethod
  def empty(cls) -> _CalibrationBins:
    zeros = jnp.zeros((ECE_NUM_BINS,), jnp.float32)
    return cls(count=zeros, confidence_sum=zeros, correct_sum=zeros)

  @classmethod
  def from_model_output(cls, *, student_logits, labels, mask, **_) -> _CalibrationBins:
    return cls(**calibration_bins(student_logits, labels, num_bins=ECE_NUM_BINS, mask=mask))

  def merge(self, other: _CalibrationBins) -> _CalibrationBins:
    return type(self)(count=self.count + other.count,
                      confidence_sum=self.confidence_sum + other.confidence_sum,
                      correct_sum=self.correct_sum + other.correct_sum)

  def compute(self) -> Array:
    return ece_from_bins(self.count, self.confidence_sum, self.correct_sum)


def _teacher_correct(s, t, y) -> Array:
  return _top1(t) == y


def _teacher_incorrect(s, t, y) -> Array:
  return _top1(t) != y


@flax.struct.dataclass
class SimilarityMetrics:
  """Streaming accumulator of the student-vs-teacher metrics of docs/design.md over an eval set.

  Per padded batch: `update = SimilarityMetrics.from_batch(s, t, y, mask)` (jit- and
  vmap-able; the state is pure arrays: sums and counts, never per-example values); across batches
  `acc = acc.merge(update)` (outside jit, or inside with a fixed state shape; start from the
  first update or from `SimilarityMetrics.empty()`); finally `acc.compute()` -> dict of Python
  floats with exactly the names of docs/design.md:

    accuracy, agreement, agree_when_teacher_correct, agree_when_teacher_incorrect,
    js_divergence, activation_distance, kl_divergence (KL(p_t || p_s)), rank_disagreement,
    mutual_information (of argmax s and argmax t, from the accumulated C x C joint counts),
    ece (of the student, from accumulated per-bin sums, 15 bins).

  Every metric is an exact function of sums over the unmasked examples, so batch boundaries and
  padding neither drop nor double-count anything (up to float32 summation order). A mean over an
  empty set (no unmasked example, or the teacher never wrong) is NaN. For R replicas, vmap
  `from_batch` over the replica axis and take replica r with
  `jax.tree_util.tree_map(lambda x: x[r], metrics)` before `compute()`.
  """
  __annotations__ = {
      "accuracy": _per_example_average(lambda s, t, y: (_top1(s) == y).astype(jnp.float32)),
      "agreement": _per_example_average(lambda s, t, y: agreement(s, t)),
      "agree_when_teacher_correct": _per_example_average(lambda s, t, y: agreement(s, t),
                                                         _teacher_correct),
      "agree_when_teacher_incorrect": _per_example_average(lambda s, t, y: agreement(s, t),
                                                           _teacher_incorrect),
      "js_divergence": _per_example_average(lambda s, t, y: js_divergence(s, t)),
      "activation_distance": _per_example_average(lambda s, t, y: activation_distance(s, t)),
      "kl_divergence": _per_example_average(lambda s, t, y: kl_divergence(t, s)),
      "rank_disagreement": _per_example_average(lambda s, t, y: rank_disagreement(s, t)),
      "mutual_information": _JointCounts,
      "ece": _CalibrationBins,
  }

  @classmethod
  def from_batch(cls, student_logits, teacher_logits, labels, mask=None) -> SimilarityMetrics:
    """The metric state of one batch: logits [..., C], labels and mask (0/1, optional) of shape
    `logits.shape[:-1]`; all leading axes are examples. Padded entries (mask 0) may hold
    garbage."""
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _checks.check_labels_shape("student_logits", student_logits, "labels", labels)
    keep = _mask_or_ones(mask, np.shape(labels))
    num_classes = np.shape(student_logits)[-1]
    # Padded rows may be NaN/inf; zeroing them keeps every per-example value finite, and
    # jnp.where in _Average then drops them.
    s = jnp.where(keep[..., None], _as_float(student_logits), 0.0).reshape(-1, num_classes)
    t = jnp.where(keep[..., None], _as_float(teacher_logits), 0.0).reshape(-1, num_classes)
    outputs = dict(student_logits=s, teacher_logits=t, labels=jnp.asarray(labels).reshape(-1),
                   mask=keep.reshape(-1))
    return cls(**{name: metric.from_model_output(**outputs)
                  for name, metric in cls.__annotations__.items()})

  @classmethod
  def empty(cls) -> SimilarityMetrics:
    """The state of no example; `empty().merge(x)` equals x."""
    return cls(**{name: metric.empty() for name, metric in cls.__annotations__.items()})

  def merge(self, other: SimilarityMetrics) -> SimilarityMetrics:
    """The state of both sets of examples."""
    return type(self)(**{name: getattr(self, name).merge(getattr(other, name))
                         for name in self.__annotations__})

  def compute(self) -> dict[str, float]:
    """The dataset metrics as Python floats (NaN for a mean over an empty set)."""
    return {name: float(value) for name, value in _compute_collection(self).items()}


@jax.jit
def _compute_collection(collection: SimilarityMetrics) -> dict[str, Array]:
  # One compiled program instead of dozens of eagerly dispatched ops (seconds on XLA:CPU).
  return {name: getattr(collection, name).compute() for name in collection.__annotations__}
