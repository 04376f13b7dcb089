"""Distillation losses and teacher-signal transforms: pure functions, importable on their own.

Conventions (all functions):
  * class axis last, any leading axes (batch, replica, sequence);
  * per-example outputs, no reduction: the caller reduces (masks for padded batches, per-replica
    weights); the one exception is a loss defined on the batch (DIST's correlation of each class
    across the batch: `dist_loss` takes the mask, and a named axis for a batch split over shards);
  * `labels` (every loss that takes them) are either integer class indices, shape
    `logits.shape[:-1]`, or soft labels: a probability vector over the classes per example, shape
    `logits.shape` (floating dtype; mixup/cutmix targets, or one-hot labels as big_vision passes
    them). The kind is decided by dtype and shape, anything else is a ValueError; soft labels are
    not checked to be non-negative or to sum to 1. A soft label q means: the cross-entropy is
    -sum_k q_k log softmax(z)_k against the full vector (an integer y is q = onehot(y)); the
    losses that split the classes into "the target" and the rest (ATS/ISATS, DKD, RegT) take the
    argmax class of q (the first on ties) as the target; FGCR fuses the label-weighted relation
    row sum_c q_c R[c]; `class_relation_matrix` weights each example's distribution by q_c.
    One-hot float labels give the same values and gradients as the integer labels;
  * hyperparameters (`alpha`, `temperature`, ...) are a Python number, validated eagerly with a
    ValueError naming the argument and the allowed range, or a traced JAX scalar/array, so a vmapped
    engine can give every replica its own value;
  * numerically stable: everything goes through `log_softmax`; logits of magnitude 1e4 and
    temperatures down to 0.1 give finite values and gradients. Inputs are computed in at least
    float32 (bfloat16 logits from an accelerator are promoted).

Notation: s = student logits, t = teacher logits, y = label, C = number of classes,
p^T = softmax(z / T), KL(p || q) = sum_k p_k (log p_k - log q_k) in nats.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import _checks

# The public functions and classes (constants and type aliases stay importable by name).
__all__ = [
    "softmax_cross_entropy",
    "kl_divergence",
    "kd_loss",
    "random_control_logits",
    "ensemble_teacher_logits",
    "standardize_logits",
    "standardized_kd_loss",
    "asymmetric_temperature_softmax",
    "ats_kd_loss",
    "isats_temperature",
    "isats_kd_loss",
    "class_relation_matrix",
    "fgcr_kd_loss",
    "regt_loss",
    "dkd_loss",
    "feature_hint_loss",
    "switch_schedule",
    "dist_inter_class",
    "dist_loss",
    "nkd_loss",
    "ttm_loss",
    "wttm_loss",
    "gradient_reversal",
    "ctkd_temperature",
    "ctkd_lambda",
    "attention_map",
    "attention_transfer_loss",
]

Array = jax.Array
Scalar = Union[float, Array]
Schedule = Union[float, Callable[[Array], Array]]

# Added to a logit to remove its class from a softmax. Finite (not -inf) on purpose: -inf makes
# p * (log p - log q) evaluate 0 * nan in the backward pass even behind jnp.where.
_MASK_OFFSET = 1e30


def _as_float(x) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_temperature(name: str, temperature) -> None:
  _checks.check_range(name, temperature, low=0.0, low_inclusive=False)


def _check_alpha(alpha) -> None:
  _checks.check_range("alpha", alpha, low=0.0, high=1.0)


def _loss_weights(alpha, ce_weight, kd_weight) -> tuple[Array, Array]:
  """(CE weight, teacher-term weight): (1 - alpha, alpha) when neither weight is given (Hinton's
  convex form), else (ce_weight, kd_weight) as given (mdistiller's CE_WEIGHT / KD_WEIGHT, the
  logit-standardisation authors' 0.1 / 9); then alpha is not used."""
  if ce_weight is None and kd_weight is None:
    _check_alpha(alpha)
    alpha = _as_float(alpha)
    return 1.0 - alpha, alpha
  if ce_weight is None or kd_weight is None:
    raise ValueError("ce_weight and kd_weight must be given together (or neither, for the "
                     f"(1 - alpha, alpha) weights); got ce_weight={ce_weight!r}, "
                     f"kd_weight={kd_weight!r}")
  _checks.check_range("ce_weight", ce_weight, low=0.0)
  _checks.check_range("kd_weight", kd_weight, low=0.0)
  return _as_float(ce_weight), _as_float(kd_weight)


def _labels_are_soft(logits_name: str, logits, labels_name: str, labels) -> bool:
  """Validates `labels` against [..., C] logits: False for integer class indices of shape
  `logits.shape[:-1]`, True for floating probability vectors of shape `logits.shape`."""
  ls, ys = tuple(np.shape(logits)), tuple(np.shape(labels))
  dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
  if len(ls) >= 1:
    if ys == ls[:-1] and jnp.issubdtype(dtype, jnp.integer):
      return False
    if ys == ls and jnp.issubdtype(dtype, jnp.floating):
      return True
  raise ValueError(f"{labels_name} must be integer class indices of shape {logits_name}.shape[:-1] "
                   f"= {ls[:-1]} or floating class probabilities of shape {logits_name}.shape = "
                   f"{ls} (class axis last), got {labels_name} {ys} of dtype {dtype} and "
                   f"{logits_name} {ls}")


def _check_pair(student_logits, teacher_logits, labels=None) -> None:
  _checks.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  if labels is not None:
    _labels_are_soft("student_logits", student_logits, "labels", labels)


def _expand_last(x) -> Array:
  """A per-example (or scalar) hyperparameter broadcast against [..., C] logits."""
  x = _as_float(x)
  return x[..., None] if x.ndim else x


def _tempered_log_softmax(logits, temperature) -> Array:
  return jax.nn.log_softmax(_as_float(logits) / _expand_last(temperature), axis=-1)


def _kl_from_log_probs(log_p: Array, log_q: Array) -> Array:
  """sum_k p_k (log p_k - log q_k); exp(log_p) underflows to exactly 0, so no 0 * inf appears."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _target_class(labels) -> Array:
  """Integer labels as they are; soft labels (floating, validated) -> their argmax class."""
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.floating):
    return jnp.argmax(labels, axis=-1)
  return labels


def _target_mask(logits, labels) -> Array:
  return jax.nn.one_hot(_target_class(labels), logits.shape[-1], dtype=bool)


# ------------------------------------------------------------------------------------------------
# Cross-entropy and KL.


def softmax_cross_entropy(logits, labels, *, label_smoothing: Scalar = 0.0) -> Array:
  """Cross-entropy with integer or soft labels and optional label smoothing, per example.

    CE = -sum_k q_k log softmax(z)_k,   q = (1 - eps) onehot(y) + eps / C

  which is how `optax.smooth_labels` defines smoothing (Szegedy et al. 2016, arXiv 1512.00567);
  a soft label q_y replaces onehot(y): q = (1 - eps) q_y + eps / C.

  Args:
    logits: [..., C] logits.
    labels: integer class indices [...] or class probabilities [..., C] (see the module
      docstring).
    label_smoothing: eps in [0, 1], a number or a traced scalar/per-example array.

  Returns:
    The cross-entropy in nats, shape `logits.shape[:-1]`.
  """
  soft = _labels_are_soft("logits", logits, "labels", labels)
  _checks.check_range("label_smoothing", label_smoothing, low=0.0, high=1.0)
  log_p = jax.nn.log_softmax(_as_float(logits), axis=-1)
  if soft:
    nll = -jnp.sum(_as_float(labels) * log_p, axis=-1)
  else:
    nll = -jnp.take_along_axis(log_p, jnp.asarray(labels)[..., None], axis=-1)[..., 0]
  eps = _as_float(label_smoothing)
  # The uniform part, -(1/C) sum_k log p_k, is written out so eps may be a traced per-replica value.
  return (1.0 - eps) * nll - eps * jnp.mean(log_p, axis=-1)


def kl_divergence(target_logits, logits, *, temperature: Scalar = 1.0) -> Array:
  """KL(softmax(target / T) || softmax(logits / T)) per example, without the T^2 factor.

  The distillation term of Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network",
  arXiv 1503.02531). `temperature` > 0; a scalar or one value per example (shape
  `logits.shape[:-1]`).

  Args:
    target_logits: [..., C] logits of the target distribution (the teacher).
    logits: [..., C] logits of the fitted distribution (the student), same shape.
    temperature: T > 0, a scalar or one value per example.

  Returns:
    The KL in nats, shape `logits.shape[:-1]`.
  """
  _checks.check_same_shape("target_logits", target_logits, "logits", logits)
  _check_temperature("temperature", temperature)
  return _kl_from_log_probs(_tempered_log_softmax(target_logits, temperature),
                            _tempered_log_softmax(logits, temperature))


def kd_loss(student_logits, teacher_logits, labels, *, alpha: Scalar = 0.5,
            temperature: Scalar = 1.0, ce_weight: Scalar | None = None,
            kd_weight: Scalar | None = None) -> Array:
  """Hinton et al. 2015 distillation loss per example (arXiv 1503.02531):

    L = (1 - alpha) * CE(y, softmax(s)) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T)),

  or, with `ce_weight` and `kd_weight` given (both, >= 0; alpha is then not used),
    L = ce_weight * CE + kd_weight * T^2 * KL,
  the independent weights of mdistiller (CE_WEIGHT 0.1, KD_WEIGHT 0.9 for CIFAR-100 KD).

  The T^2 factor keeps the soft-target gradient magnitude independent of T. At T = 1 the gradient
  is dL/ds_k = p_s,k - (1 - alpha) 1[k = y] - alpha p_t,k: the student is pulled towards a mixture
  of label and teacher, which is the basis of the negative-asymmetric-payoff argument of
  Mason-Williams et al. (arXiv 2510.12615). The teacher is treated as a constant (stop_gradient).
  With a soft label q, CE = -sum_k q_k log softmax(s)_k (and the gradient pulls towards q).

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C] (see the module
      docstring).
    alpha: the teacher term's weight in [0, 1]; the cross-entropy gets 1 - alpha.
    temperature: T > 0, a scalar or one value per example.
    ce_weight: with `kd_weight`, the cross-entropy's weight (>= 0) instead of 1 - alpha.
    kd_weight: with `ce_weight`, the teacher term's weight (>= 0) instead of alpha.

  Returns:
    The loss per example, shape `student_logits.shape[:-1]`, float32 or wider.
  """
  _check_pair(student_logits, teacher_logits, labels)
  ce_w, kd_w = _loss_weights(alpha, ce_weight, kd_weight)
  _check_temperature("temperature", temperature)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  temperature = _as_float(temperature)
  ce = softmax_cross_entropy(student_logits, labels)
  kl = kl_divergence(teacher_logits, student_logits, temperature=temperature)
  return ce_w * ce + kd_w * temperature**2 * kl


# ------------------------------------------------------------------------------------------------
# Teacher signals.


def random_control_logits(key, shape, *, minval: float = 0.0, maxval: float = 1.0,
                          dtype=jnp.float32) -> Array:
  """Uniform-noise teacher logits for random control distillation (RCD).

  RCD (Mason-Williams et al., arXiv 2510.12615) replaces the teacher's logits with i.i.d.
  U[minval, maxval) noise of the same shape, a control that keeps the form of the distillation
  loss but removes the teacher's knowledge. Draw fresh noise per step from the replica's `rcd`
  key stream.

  Args:
    key: a `jax.random` key.
    shape: the teacher logits' shape, e.g. [..., C].
    minval: the noise's lower bound (inclusive).
    maxval: the noise's upper bound (exclusive), > minval.
    dtype: the result's dtype.

  Returns:
    Uniform noise of shape `shape`.
  """
  _checks.check_range("minval", minval)
  _checks.check_range("maxval", maxval)
  if _checks.is_static_number(minval) and _checks.is_static_number(maxval) and minval >= maxval:
    raise ValueError(f"minval must be < maxval, got minval={minval!r}, maxval={maxval!r}")
  return jax.random.uniform(key, tuple(shape), dtype=dtype, minval=minval, maxval=maxval)


_ENSEMBLE_MODES = ("mean_probs", "mean_logits")


def ensemble_teacher_logits(teacher_logits, *, axis: int = 0, mode: str = "mean_probs") -> Array:
  """Logits whose softmax is a teacher ensemble's distribution (arXiv 2405.00739 distils from
  ensembles of teachers trained with different augmentation strengths).

    mode="mean_probs":  log((1/M) sum_m softmax(t_m)) = logsumexp_m(log_softmax(t_m)) - log M,
                        the ensemble's mixture distribution;
    mode="mean_logits": (1/M) sum_m t_m, the normalised geometric mean of the members'
                        distributions.
  `axis` is the member axis (not the class axis).

  Args:
    teacher_logits: the members' logits, with a member axis and the class axis last.
    axis: the member axis (not the class axis).
    mode: "mean_probs" or "mean_logits".

  Returns:
    The ensemble's logits, `teacher_logits` without the member axis.
  """
  _checks.check_choice("mode", mode, _ENSEMBLE_MODES)
  teacher_logits = _as_float(teacher_logits)
  if teacher_logits.ndim < 2:
    raise ValueError(f"teacher_logits needs a member axis and a class axis, got shape "
                     f"{teacher_logits.shape}")
  member_axis = axis % teacher_logits.ndim
  if member_axis == teacher_logits.ndim - 1:
    raise ValueError(f"axis={axis} is the class axis; pass the ensemble-member axis")
  if mode == "mean_logits":
    return jnp.mean(teacher_logits, axis=member_axis)
  log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
  num_members = teacher_logits.shape[member_axis]
  return jax.nn.logsumexp(log_p, axis=member_axis) - jnp.log(num_members)


def standardize_logits(logits, *, eps: float = 1e-7) -> Array:
  """Per-example z-score of the logits (logit standardisation, Sun et al., CVPR 2024,
  "Logit Standardization in Knowledge Distillation", arXiv 2403.01427; used by arXiv 2405.00739):

    z' = (z - mean_k z_k) / (std_k z_k + eps),

  with the sample standard deviation (Bessel-corrected and eps added, as `torch.std` in the
  authors' code; the paper's Algorithm 1 writes the 1/C form without eps, which differs by the
  constant factor sqrt(C / (C - 1))). Distil with `standardized_kd_loss`: the KL term between
  the z-scored logits, the cross-entropy on the student's raw logits (as the authors' code and
  kdjax's `standardized_kd` arm do; `kd_loss(standardize_logits(s), standardize_logits(t), ...)`
  would put the cross-entropy on z-scored logits too). The authors' CIFAR-100 recipe: base
  temperature 2, ce_weight 0.1, kd_weight 9. Constant logits map to 0 with a zero (not NaN)
  gradient.

  Args:
    logits: [..., C] logits, C >= 2.
    eps: >= 0, added to the standard deviation.

  Returns:
    The standardised logits, shape `logits.shape`.
  """
  _checks.check_range("eps", eps, low=0.0)
  logits = _as_float(logits)
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"standardize_logits needs at least 2 classes, got shape {logits.shape}")
  centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
  variance = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (num_classes - 1)
  # sqrt has an infinite derivative at 0: take it only where the variance is positive.
  positive = variance > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
  return centred / (std + eps)


def standardized_kd_loss(student_logits, teacher_logits, labels, *, alpha: Scalar = 0.5,
                         temperature: Scalar = 1.0, ce_weight: Scalar | None = None,
                         kd_weight: Scalar | None = None) -> Array:
  """KD between standardised logits (Sun et al., CVPR 2024, arXiv 2403.01427), per example:

    L = w_ce CE(y, softmax(s)) + w_kd T^2 KL(softmax(z(t) / T) || softmax(z(s) / T)),

  z = `standardize_logits`, the cross-entropy on the raw student logits, and (w_ce, w_kd) =
  (1 - alpha, alpha) or (`ce_weight`, `kd_weight`) when both are given. The authors' code
  (sunshangquan/logit-standardization-KD, on mdistiller) trains CIFAR-100 with T = 2,
  ce_weight = 0.1 and kd_weight = 9, which the (1 - alpha, alpha) form cannot express.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C]; the cross-entropy is
      taken against the full vector (see the module docstring).
    alpha: the teacher term's weight in [0, 1]; the cross-entropy gets 1 - alpha.
    temperature: T > 0, applied to the standardised logits; a scalar or one value per example.
    ce_weight: with `kd_weight`, the cross-entropy's weight (>= 0) instead of 1 - alpha.
    kd_weight: with `ce_weight`, the teacher term's weight (>= 0) instead of alpha.

  Returns:
    The loss per example, shape `student_logits.shape[:-1]`.
  """
  _check_pair(student_logits, teacher_logits, labels)
  ce_w, kd_w = _loss_weights(alpha, ce_weight, kd_weight)
  _check_temperature("temperature", temperature)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  kl = kl_divergence(standardize_logits(teacher_logits), standardize_logits(student_logits),
                     temperature=temperature)
  return ce_w * softmax_cross_entropy(student_logits, labels) + \
      kd_w * _as_float(temperature)**2 * kl


# ------------------------------------------------------------------------------------------------
# Temperature scaling: ATS and ISATS.


def _asymmetric_scaled_logits(logits, labels, target_temperature, nontarget_temperature) -> Array:
  logits = _as_float(logits)
  is_target = _target_mask(logits, labels)
  return jnp.where(is_target, logits / _expand_last(target_temperature),
                   logits / _expand_last(nontarget_temperature))


def asymmetric_temperature_softmax(logits, labels, *, target_temperature: Scalar,
                                   nontarget_temperature: Scalar) -> Array:
  """Asymmetric temperature scaling (ATS; Li et al., NeurIPS 2022, arXiv 2210.04427):

    p_k = exp(z_k / tau_k) / sum_j exp(z_j / tau_j),  tau_y = target_temperature (tau_1),
                                                      tau_k = nontarget_temperature (tau_2, k != y).

  The paper's motivation is a larger target than non-target temperature (tau_1 > tau_2 softens an
  over-confident teacher's target probability while keeping its non-target classes distinct), but
  the authors' code (lxcnju/ATS-LargeKD, `train_distill_ats.py`) searches every pair
  tau_1 in {1, ..., 6} x tau_2 in {1, ..., 5} without that constraint, and so does kdjax: any
  two temperatures > 0 (scalars or one per example). Unlike plain temperature scaling, ATS is
  not invariant to adding a constant to the logits.

  Args:
    logits: [..., C] logits.
    labels: integer class indices [...] or class probabilities [..., C]; a soft label's target
      class y is its argmax (the first on ties).
    target_temperature: tau_1 > 0 for the target class, a scalar or one value per example.
    nontarget_temperature: tau_2 > 0 for the other classes, a scalar or one value per example.

  Returns:
    The probabilities p, shape `logits.shape`, class axis last.
  """
  _labels_are_soft("logits", logits, "labels", labels)
  _check_temperature("target_temperature", target_temperature)
  _check_temperature("nontarget_temperature", nontarget_temperature)
  return jax.nn.softmax(
      _asymmetric_scaled_logits(logits, labels, target_temperature, nontarget_temperature), -1)


def ats_kd_loss(student_logits, teacher_logits, labels, *, alpha: Scalar = 0.5,
                target_temperature: Scalar, nontarget_temperature: Scalar,
                temperature: Scalar = 1.0, ce_weight: Scalar | None = None,
                kd_weight: Scalar | None = None) -> Array:
  """KD from an asymmetric-temperature-scaled teacher (ATS, arXiv 2210.04427), per example:

    L = w_ce CE(y, s) + w_kd T^2 KL(p_t^ATS || softmax(s / T)),

  p_t^ATS = `asymmetric_temperature_softmax(t, y, tau_1, tau_2)`, T the student's temperature,
  (w_ce, w_kd) = (1 - alpha, alpha) or (`ce_weight`, `kd_weight`) when both are given.

  The authors' code (lxcnju/ATS-LargeKD, `distill.py`) uses T = 1 (`s_tau`), alpha = 0.5
  (`lamb`: (1 - lamb) CE + lamb KD) and the cross-entropy -sum_k p_t,k log softmax(s / T)_k
  instead of the KL; the two differ by T^2 times the teacher's entropy, a constant for the
  student, so the gradients are equal. kdjax's defaults (T = 1, alpha = 0.5) are theirs.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C]; with a soft label the
      ATS target class is its argmax (the first on ties) and the cross-entropy is taken against
      the full vector.
    alpha: the teacher term's weight in [0, 1]; the cross-entropy gets 1 - alpha.
    target_temperature: tau_1 > 0, the teacher's target-class temperature.
    nontarget_temperature: tau_2 > 0, the teacher's non-target temperature.
    temperature: the student's temperature T > 0.
    ce_weight: with `kd_weight`, the cross-entropy's weight (>= 0) instead of 1 - alpha.
    kd_weight: with `ce_weight`, the teacher term's weight (>= 0) instead of alpha.
    (Temperatures are scalars or one value per example.)

  Returns:
    The loss per example, shape `student_logits.shape[:-1]`.
  """
  _check_pair(student_logits, teacher_logits, labels)
  ce_w, kd_w = _loss_weights(alpha, ce_weight, kd_weight)
  _check_temperature("target_temperature", target_temperature)
  _check_temperature("nontarget_temperature", nontarget_temperature)
  _check_temperature("temperature", temperature)
  teacher = jax.lax.stop_gradient(_asymmetric_scaled_logits(
      teacher_logits, labels, target_temperature, nontarget_temperature))
  kl = _kl_from_log_probs(jax.nn.log_softmax(teacher, -1),
                          _tempered_log_softmax(student_logits, temperature))
  return ce_w * softmax_cross_entropy(student_logits, labels) + \
      kd_w * _as_float(temperature)**2 * kl


def _nontarget_probability_variance(probs, labels) -> Array:
  """Population variance over the C - 1 non-target entries of `probs` (not renormalised)."""
  is_target = _target_mask(probs, labels)
  num_nontarget = probs.shape[-1] - 1
  nontarget = jnp.where(is_target, 0.0, probs)
  mean = jnp.sum(nontarget, -1, keepdims=True) / num_nontarget
  return jnp.sum(jnp.where(is_target, 0.0, (probs - mean)**2), -1) / num_nontarget


# The default ISATS search space of tau_2: 1.0, 1.1, ..., 5.0, the ATS authors' non-target range
# (1..5) at spacing 0.1.
ISATS_TEMPERATURES = tuple(round(1.0 + 0.1 * i, 1) for i in range(41))


def isats_temperature(teacher_logits, labels, *, target_temperature: Scalar,
                      temperatures=ISATS_TEMPERATURES) -> Array:
  """Instance-specific non-target temperature of ISATS (arXiv 2405.13078), per example:

    tau_2*(x) = argmax_{tau_2 in grid} Var_{k != y} q_k(x; tau_1, tau_2),
    q(x; tau_1, tau_2) = asymmetric_temperature_softmax(t(x), y, tau_1, tau_2),

  the population variance of the C - 1 non-target entries of the ATS distribution over all C
  classes (not renormalised), with the target temperature tau_1 fixed: the non-target
  temperature at which the teacher's non-target probabilities, as the student will see them,
  are most distinct. This is kdjax's reading of ISATS (instance-specific ATS: target and
  non-target temperatures differ, the non-target one chosen per example to maximise the
  non-target variance); the method section's exact rule, in particular how tau_1 is set, was not
  available to us, so tau_1 is a study-wide option.

  A fine grid search, not a closed form: the variance is a transcendental function of tau_2
  (a ratio of sums of exponentials) with no closed-form maximiser, and it need not be unimodal
  (it trades the non-target mass, which grows with tau_2 when non-target logits are negative,
  against their spread, which shrinks), so a grid finds the global maximum up to its spacing.
  Default grid: `ISATS_TEMPERATURES`, 1.0 to 5.0 in steps of 0.1. Ties go to the first grid
  value. Returns `teacher_logits.shape[:-1]` temperatures; no gradient flows.

  Known limit: with tau_1 fixed, the variance grows as tau_2 falls unless the non-target logits
  are strongly negative, so the grid's lower end can decide: on kdjax's digits smoke teachers
  (configs/capacity_mismatch.py) tau_2 = 1 wins for every example and ISATS equals ATS with
  (tau_1, 1). Check the chosen temperatures (this function) before reading ISATS results.

  Args:
    teacher_logits: [..., C] teacher logits, C >= 3 (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C]; a soft label's target
      class y is its argmax (the first on ties).
    target_temperature: tau_1 > 0, a scalar or one value per example.
    temperatures: the grid of candidate tau_2 values, all finite and > 0.

  Returns:
    The chosen tau_2 per example, shape `teacher_logits.shape[:-1]`.
  """
  _labels_are_soft("teacher_logits", teacher_logits, "labels", labels)
  _check_temperature("target_temperature", target_temperature)
  grid = np.asarray(temperatures, dtype=np.float32).reshape(-1)
  if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
    raise ValueError(f"temperatures must be a non-empty grid of finite values > 0, got "
                     f"{temperatures!r}")
  if np.shape(teacher_logits)[-1] < 3:
    raise ValueError("isats_temperature needs at least 3 classes (a variance over >= 2 "
                     f"non-target classes), got shape {np.shape(teacher_logits)}")
  logits = jax.lax.stop_gradient(_as_float(teacher_logits))
  labels = _target_class(labels)
  is_target = _target_mask(logits, labels)[..., None, :]                   # [..., 1, C]
  target_t = _expand_last(jax.lax.stop_gradient(_as_float(target_temperature)))[..., None]
  scaled = jnp.where(is_target, logits[..., None, :] / target_t,
                     logits[..., None, :] / grid[:, None])                 # [..., G, C]
  variances = _nontarget_probability_variance(jax.nn.softmax(scaled, -1), labels[..., None])
  return jnp.asarray(grid)[jnp.argmax(variances, axis=-1)]


def isats_kd_loss(student_logits, teacher_logits, labels, *, alpha: Scalar = 0.5,
                  target_temperature: Scalar, temperatures=ISATS_TEMPERATURES,
                  temperature: Scalar = 1.0, ce_weight: Scalar | None = None,
                  kd_weight: Scalar | None = None) -> Array:
  """KD from the teacher under instance-specific asymmetric temperature scaling (ISATS, arXiv
  2405.13078), per example:

    L = ats_kd_loss(s, t, y, target_temperature=tau_1, nontarget_temperature=tau_2*(x),
                    temperature=T, ...),
    tau_2*(x) = isats_temperature(t, y, target_temperature=tau_1, temperatures=grid),

  i.e. ATS whose non-target temperature is chosen per example. The student's temperature T and
  the weights follow the ATS authors' code by default (T = 1, alpha = 0.5; see `ats_kd_loss`).

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits, C >= 3 (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C]; with a soft label the
      target class is its argmax (the first on ties) and the cross-entropy is taken against the
      full vector.
    alpha: the teacher term's weight in [0, 1]; the cross-entropy gets 1 - alpha.
    target_temperature: tau_1 > 0, a scalar or one value per example.
    temperatures: the grid searched for tau_2 (`isats_temperature`).
    temperature: the student's temperature T > 0.
    ce_weight: with `kd_weight`, the cross-entropy's weight (>= 0) instead of 1 - alpha.
    kd_weight: with `ce_weight`, the teacher term's weight (>= 0) instead of alpha.

  Returns:
    The loss per example, shape `student_logits.shape[:-1]`.
  """
  _check_pair(student_logits, teacher_logits, labels)
  tau = isats_temperature(teacher_logits, labels, target_temperature=target_temperature,
                          temperatures=temperatures)
  return ats_kd_loss(student_logits, teacher_logits, labels, alpha=alpha,
                     target_temperature=target_temperature, nontarget_temperature=tau,
                     temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)


def class_relation_matrix(teacher_logits, labels, num_classes: int, *, temperature: Scalar = 1.0,
                          mask=None) -> Array:
  """Global class relations of a teacher, for FGCR (arXiv 2405.13078):

    R[c] = mean over examples x with label c of softmax(t(x) / T),

  the teacher's average tempered distribution per class, a [C, C] row-stochastic matrix whose row c
  ranks the classes by their affinity to c. Compute it once from the teacher's logits on the
  training set (`mask` zero-weights padded examples). A class with no example gets the uniform row.
  With soft labels q each example counts towards every class c with weight q_c:
  R[c] = sum_x q_c(x) softmax(t(x) / T) / sum_x q_c(x).

  Args:
    teacher_logits: [..., C] teacher logits.
    labels: integer class indices [...] or class probabilities [..., C].
    num_classes: C, which must match the logits' class axis.
    temperature: T > 0.
    mask: optional weights of shape `teacher_logits.shape[:-1]` (0 for padding).

  Returns:
    R, a [C, C] row-stochastic matrix.
  """
  soft = _labels_are_soft("teacher_logits", teacher_logits, "labels", labels)
  _check_temperature("temperature", temperature)
  if np.shape(teacher_logits)[-1] != num_classes:
    raise ValueError(f"teacher_logits has {np.shape(teacher_logits)[-1]} classes, num_classes is "
                     f"{num_classes}")
  probs = jax.nn.softmax(_tempered_log_softmax(teacher_logits, temperature), -1)
  probs = probs.reshape(-1, num_classes)
  weights = jnp.ones(probs.shape[0]) if mask is None else _as_float(mask).reshape(-1)
  if soft:
    onehot = _as_float(labels).reshape(-1, num_classes) * weights[:, None]
  else:
    onehot = jax.nn.one_hot(jnp.asarray(labels).reshape(-1), num_classes) * weights[:, None]
  sums, counts = onehot.T @ probs, onehot.sum(0)[:, None]
  if soft:  # label-weighted counts may lie in (0, 1)
    return jnp.where(counts > 0, sums / jnp.where(counts > 0, counts, 1.0), 1.0 / num_classes)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 1.0 / num_classes)


def fgcr_kd_loss(student_logits, teacher_logits, labels, class_relations, *,
                 alpha: Scalar = 0.5, fusion: Scalar = 0.5, temperature: Scalar = 1.0,
                 ce_weight: Scalar | None = None, kd_weight: Scalar | None = None) -> Array:
  """KD from a teacher whose instance distribution is fused with global class relations (FGCR,
  arXiv 2405.13078), per example:

    q(x)   = (1 - fusion) softmax(t(x)) + fusion R[y],      R = class_relation_matrix(..., T=1),
    q^T(x) = softmax(log q(x) / T)  (= q^(1/T), renormalised),
    L      = w_ce CE(y, s) + w_kd T^2 KL(q^T || softmax(s / T)),

  (w_ce, w_kd) = (1 - alpha, alpha) or (`ce_weight`, `kd_weight`) when both are given.

  Both distributions are fused at the same temperature, 1 (`class_relations` must be computed at
  T = 1, as kdjax's engine does), and the fused distribution is then softened with the study
  temperature exactly as plain KD softens the teacher (softmax(t / T) = softmax(log softmax(t) / T)),
  so fusion = 0 is plain KD at temperature T. Fusing a distribution at T with relations at 1
  mixes two scales: on an over-confident teacher at T = 4 the relations' near-one-hot rows pulled
  the target probability up (0.24 -> 0.62) and flattened the non-target classes, the opposite of
  what FGCR is for. Fused at one temperature, the relations add the class-level affinities that
  an over-confident teacher's own non-target probabilities lack: the fused target has more
  non-target variance than the teacher's own distribution at the same T.

  The paper's observation is that large teachers' instance-level non-target probabilities are
  nearly indistinct while their class-affinity ranks stay consistent. This is kdjax's reading of
  FGCR (the method section's exact fusion rule was not available to us): a convex mixture,
  `fusion` in [0, 1]. With a soft label q, R[y] becomes the label-weighted row sum_c q_c R[c]
  and the cross-entropy is taken against q.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C].
    class_relations: the [C, C] matrix R of `class_relation_matrix`, computed at T = 1.
    alpha: the teacher term's weight in [0, 1]; the cross-entropy gets 1 - alpha.
    fusion: the relations' share in [0, 1].
    temperature: T > 0, a scalar or one value per example.
    ce_weight: with `kd_weight`, the cross-entropy's weight (>= 0) instead of 1 - alpha.
    kd_weight: with `ce_weight`, the teacher term's weight (>= 0) instead of alpha.

  Returns:
    The loss per example, shape `student_logits.shape[:-1]`.
  """
  _check_pair(student_logits, teacher_logits, labels)
  ce_w, kd_w = _loss_weights(alpha, ce_weight, kd_weight)
  _checks.check_range("fusion", fusion, low=0.0, high=1.0)
  _check_temperature("temperature", temperature)
  num_classes = np.shape(student_logits)[-1]
  if tuple(np.shape(class_relations)) != (num_classes, num_classes):
    raise ValueError(f"class_relations must have shape ({num_classes}, {num_classes}), got "
                     f"{tuple(np.shape(class_relations))}")
  fusion = _as_float(fusion)
  teacher_probs = jax.nn.softmax(_as_float(jax.lax.stop_gradient(teacher_logits)), -1)
  if jnp.issubdtype(jnp.asarray(labels).dtype, jnp.floating):
    # sum_c q_c R[c], elementwise (a matmul may round R on an accelerator's default precision).
    relations = jnp.sum(_as_float(labels)[..., :, None] * _as_float(class_relations), axis=-2)
  else:
    relations = _as_float(class_relations)[labels]
  fused = (1.0 - fusion) * teacher_probs + fusion * relations
  log_fused = jnp.log(jnp.clip(jax.lax.stop_gradient(fused), jnp.finfo(jnp.float32).tiny))
  kl = _kl_from_log_probs(_tempered_log_softmax(log_fused, temperature),
                          _tempered_log_softmax(student_logits, temperature))
  return ce_w * softmax_cross_entropy(student_logits, labels) + \
      kd_w * _as_float(temperature)**2 * kl


def regt_loss(teacher_logits, labels, *, weight: Scalar = 1.0, temperature: Scalar = 1.0) -> Array:
  """Teacher training loss with the RegT regulariser (regularising teachers, arXiv 2405.13078):

    L = CE(y, t) - weight * Var_{k != y}((C - 1) p_hat_k) / (C - 2),
    p_hat = softmax over the non-target classes of t / T,

  cross-entropy minus a reward for distinct non-target probabilities, the quantity the paper
  finds large teachers lose. The variance is of the renormalised non-target distribution scaled
  by C - 1 (mean 1), divided by its largest value C - 2, so the reward lies in [0, weight] for
  every C and `weight` >= 0 means the same across datasets. (Without the division the reward
  grew with C: up to 4.9 nats at C = 100 with weight 0.05, far above a trained teacher's CE.)

  What the reward does, checked against the method's intent: it is 0 for uniform non-target
  probabilities and largest (= weight) when all non-target mass sits on one class. The CE term
  depends on the target probability only, so nothing opposes the reward inside p_hat: with any
  weight > 0 it pushes each example's non-target distribution towards its largest class. The
  intent is distinct non-target probabilities that keep the class affinities; a spike on one
  class keeps only the top affinity. Keep `weight` small (kdjax's default 0.05 bounds the reward
  at 0.05 nats) and check the teachers' class-rank consistency (the `capacity` section) when
  raising it. This is kdjax's reading of RegT (the method section's exact regulariser was not
  available to us).

  Args:
    teacher_logits: [..., C] teacher logits, C >= 3.
    labels: integer class indices [...] or class probabilities [..., C]; with a soft label the
      target class y (left out of the variance) is its argmax (the first on ties) and the
      cross-entropy is taken against the full vector.
    weight: the reward's weight, >= 0.
    temperature: T > 0 for the non-target distribution, a scalar or one value per example.

  Returns:
    The loss per example, shape `teacher_logits.shape[:-1]`.
  """
  _labels_are_soft("teacher_logits", teacher_logits, "labels", labels)
  _checks.check_range("weight", weight, low=0.0)
  _check_temperature("temperature", temperature)
  num_classes = np.shape(teacher_logits)[-1]
  if num_classes < 3:
    raise ValueError(f"regt_loss needs at least 3 classes, got shape {np.shape(teacher_logits)}")
  is_target = _target_mask(teacher_logits, labels)
  scaled = _as_float(teacher_logits) / _expand_last(temperature)
  nontarget = jax.nn.softmax(jnp.where(is_target, scaled - _MASK_OFFSET, scaled), -1)
  spread = _nontarget_probability_variance((num_classes - 1) * nontarget, labels)
  return softmax_cross_entropy(teacher_logits, labels) - \
      _as_float(weight) * spread / (num_classes - 2)


# ------------------------------------------------------------------------------------------------
# Decoupled KD.


def dkd_loss(student_logits, teacher_logits, labels, *, alpha: Scalar = 1.0, beta: Scalar = 8.0,
             temperature: Scalar = 4.0) -> Array:
  """Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv 2203.08679), per example:

    DKD = alpha * TCKD + beta * NCKD, both multiplied by T^2 (as in the authors' code), where
    TCKD = KL(b_t || b_s),  b = [p_y, 1 - p_y] with p = softmax(z / T)   (target vs rest),
    NCKD = KL(p_hat_t || p_hat_s), p_hat = softmax over the non-target classes of z / T.
  The caller adds the cross-entropy term.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C]; a soft label's target
      class y is its argmax (the first on ties).
    alpha: TCKD's weight, >= 0.
    beta: NCKD's weight, >= 0.
    temperature: T > 0, a scalar or one value per example.

  Returns:
    The loss per example, shape `student_logits.shape[:-1]`.
  """
  _check_pair(student_logits, teacher_logits, labels)
  _checks.check_range("alpha", alpha, low=0.0)
  _checks.check_range("beta", beta, low=0.0)
  _check_temperature("temperature", temperature)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  is_target = _target_mask(student_logits, labels)

  def decoupled_log_probs(logits):
    scaled = _as_float(logits) / _expand_last(temperature)
    log_norm = jax.nn.logsumexp(scaled, axis=-1)
    nontarget = jnp.where(is_target, scaled - _MASK_OFFSET, scaled)
    log_p_target = jnp.sum(jnp.where(is_target, scaled, 0.0), -1) - log_norm
    log_p_rest = jax.nn.logsumexp(nontarget, axis=-1) - log_norm
    binary = jnp.stack([log_p_target, log_p_rest], axis=-1)
    return binary, jax.nn.log_softmax(nontarget, axis=-1)

  binary_t, nontarget_t = decoupled_log_probs(teacher_logits)
  binary_s, nontarget_s = decoupled_log_probs(student_logits)
  scale = _as_float(temperature)**2
  tckd = _kl_from_log_probs(binary_t, binary_s)
  nckd = _kl_from_log_probs(nontarget_t, nontarget_s)
  return scale * (_as_float(alpha) * tckd + _as_float(beta) * nckd)


# ------------------------------------------------------------------------------------------------
# Feature matching and loss-weight schedules.


def feature_hint_loss(student_features, teacher_features) -> Array:
  """FitNets hint loss (Romero et al., ICLR 2015, arXiv 1412.6550), per example:

    L = mean over all non-batch axes of (f_s - f_t)^2,

  axis 0 being the batch axis (under vmap over replicas, each replica's own batch axis). The
  student's features must already have the teacher's shape (a regressor, e.g. a 1x1 conv, is part
  of the student); the teacher's features get no gradient. Used for the feature-map-matching
  variants of arXiv 2510.12615.

  Args:
    student_features: [B, ...] student features (after the regressor).
    teacher_features: [B, ...] teacher features of the same shape (no gradient flows to them).

  Returns:
    The mean squared difference per example, shape [B].
  """
  _checks.check_same_shape("student_features", student_features,
                           "teacher_features", teacher_features)
  if np.ndim(student_features) < 1:
    raise ValueError("feature_hint_loss needs a batch axis, got scalar features")
  diff = _as_float(student_features) - jax.lax.stop_gradient(_as_float(teacher_features))
  return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def _as_schedule(value: Schedule, name: str) -> Callable[[Array], Array]:
  if callable(value):
    return value
  _checks.check_range(name, value)
  return optax.constant_schedule(value)


def switch_schedule(boundary: int, *, before: Schedule, after: Schedule) -> optax.Schedule:
  """An optax schedule for a loss weight that switches at step `boundary`:

    w(step) = before(step) if step < boundary else after(step),

  with `before`/`after` a number or any optax schedule, evaluated at the absolute step (not
  restarted at the boundary), so switches nest: one-hot -> KD at step a and back at step b is
  `switch_schedule(a, before=0.0, after=switch_schedule(b, before=1.0, after=0.0))` — the
  loss-switching experiments of Nagarajan et al. (arXiv 2301.12923, Sec. 3). `boundary` may also
  be a traced integer (one switch step per replica inside a vmapped engine).

  Args:
    boundary: the switch step, an integer >= 0 or a traced integer.
    before: the weight before `boundary`, a number or an optax schedule.
    after: the weight from `boundary` on, a number or an optax schedule.

  Returns:
    An optax schedule, step -> weight.
  """
  if not isinstance(boundary, jax.Array) and (
      not isinstance(boundary, (int, np.integer)) or isinstance(boundary, bool) or boundary < 0):
    raise ValueError(f"boundary must be an integer step >= 0, got {boundary!r}")
  before_fn = _as_schedule(before, "before")
  after_fn = _as_schedule(after, "after")

  def schedule(step):
    return jnp.where(jnp.asarray(step) < boundary, before_fn(step), after_fn(step))

  return schedule


# ------------------------------------------------------------------------------------------------
# Correlation-based distillation: DIST.

# Added to the product of the two norms in the Pearson correlation (the authors' cosine similarity
# takes (a . b) / (|a| |b| + 1e-8)); it makes a constant vector correlate 0 with anything.
_PEARSON_EPS = 1e-8


def _safe_sqrt(x: Array) -> Array:
  """sqrt with a zero (not infinite) derivative at 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _pearson_from_centred_sums(sxy: Array, sxx: Array, syy: Array) -> Array:
  return sxy / (_safe_sqrt(sxx) * _safe_sqrt(syy) + _PEARSON_EPS)


def _tempered_probs(logits, temperature) -> Array:
  return jnp.exp(_tempered_log_softmax(logits, temperature))


def _pearson_over_classes(x: Array, y: Array) -> Array:
  dx = x - jnp.mean(x, axis=-1, keepdims=True)
  dy = y - jnp.mean(y, axis=-1, keepdims=True)
  return _pearson_from_centred_sums(jnp.sum(dx * dy, -1), jnp.sum(dx * dx, -1),
                                    jnp.sum(dy * dy, -1))


def dist_inter_class(student_logits, teacher_logits, *, temperature: Scalar = 1.0) -> Array:
  """DIST's inter-class relation distance per example (Huang et al., NeurIPS 2022, "Knowledge
  Distillation from A Stronger Teacher", arXiv 2205.10536; code hunto/DIST_KD):

    d_inter(x) = 1 - rho(p_s(x), p_t(x)),   p = softmax(z / T),

  rho the Pearson correlation over the C classes of one example,
  rho(u, v) = sum_k (u_k - mean u)(v_k - mean v) / (|u - mean u| |v - mean v| + 1e-8), the 1e-8
  as in the authors' code (a constant vector correlates 0). Without the T^2 factor and without
  the batch-level intra-class term: `dist_loss` is the whole DIST loss.

  Args:
    student_logits: [..., C] student logits, C >= 2.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    temperature: T > 0, a scalar or one value per example.

  Returns:
    1 - rho per example, in [0, 2], shape `student_logits.shape[:-1]`.
  """
  _checks.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _check_temperature("temperature", temperature)
  if np.shape(student_logits)[-1:] in ((), (1,)):
    raise ValueError(f"dist_inter_class needs at least 2 classes, got shape "
                     f"{np.shape(student_logits)}")
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  return 1.0 - _pearson_over_classes(_tempered_probs(student_logits, temperature),
                                     _tempered_probs(teacher_logits, temperature))


def dist_loss(student_logits, teacher_logits, *, mask=None, beta: Scalar = 1.0,
              gamma: Scalar = 1.0, temperature: Scalar = 1.0,
              axis_name: str | None = None) -> Array:
  """DIST (Huang et al., NeurIPS 2022, arXiv 2205.10536), a batch-level loss:

    L = T^2 (beta * inter + gamma * intra),   p = softmax(z / T),
    inter = mean over examples i of (1 - rho(p_s[i, :], p_t[i, :]))     (`dist_inter_class`),
    intra = mean over classes c of (1 - rho(p_s[:, c], p_t[:, c])),

  rho the Pearson correlation (with 1e-8 added to the product of the norms, as in the authors'
  code): `inter` correlates each example's class distribution, `intra` each class's
  probabilities across the batch, which is why DIST has no per-example form. All leading axes
  of the logits are the batch (as the authors flatten pixels for segmentation). The caller adds
  the cross-entropy.

  The authors' code (hunto/DIST_KD, whose classification part is hunto/image_classification_sota,
  `lib/models/losses/dist_kd.py` and `kd_loss.py`): beta = gamma = 1 throughout, T = 1 on
  ImageNet (`kd: dist`, configs/strategies/distill/resnet_dist.yaml and dist_b2.yaml), T = 4 on
  CIFAR-100 (`kd: dist_t4`, dist_cifar.yaml); both terms are multiplied by T^2 (their `tau**2`),
  and the total loss is 1 * CE + 2 * DIST (`ori_loss_weight` 1, `kd_loss_weight` 2) in all three
  configs.

  `mask` (0 for padded examples) removes examples from both terms: from the mean over examples
  and from every per-class correlation (means, covariances and norms). With `axis_name`, the
  batch is split over that named axis (data shards under `shard_map`/`pmap`, or
  `jax.vmap(..., axis_name=...)`): the per-class statistics (count, sum p_s, sum p_t, then the
  centred sums of p_s p_t, p_s^2, p_t^2) and the inter-class sum are `jax.lax.psum`med over it,
  so every shard returns the whole batch's loss. The centred sums are taken about the whole
  batch's mean (a second psum), not as sum(x y) - sum(x) sum(y) / n, which loses the variance of a
  class whose probability barely varies across the batch to float32 cancellation. Under
  `jax.vmap(..., axis_name=...)` the mean over shards of the result has the unsplit loss's
  gradient.

  Args:
    student_logits: [..., C] student logits, C >= 2 (at least one leading batch axis).
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    mask: optional weights of shape `student_logits.shape[:-1]`, 1 for real and 0 for padded
      examples (other non-negative values weight the examples in every mean and sum).
    beta: the inter-class term's weight, >= 0.
    gamma: the intra-class term's weight, >= 0.
    temperature: T > 0, a scalar (a traced scalar under a per-replica vmap).
    axis_name: the named axis the batch is split over, or None for an unsplit batch.

  Returns:
    The batch loss, a scalar (0 for a batch whose mask is all 0).
  """
  _checks.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  shape = tuple(np.shape(student_logits))
  if len(shape) < 2 or shape[-1] < 2:
    raise ValueError(f"dist_loss needs a batch axis and at least 2 classes, got shape {shape}")
  if mask is not None and tuple(np.shape(mask)) != shape[:-1]:
    raise ValueError(f"mask must have shape student_logits.shape[:-1] = {shape[:-1]}, got "
                     f"{tuple(np.shape(mask))}")
  _checks.check_range("beta", beta, low=0.0)
  _checks.check_range("gamma", gamma, low=0.0)
  _check_temperature("temperature", temperature)
  if np.ndim(temperature) != 0:
    raise ValueError(f"dist_loss takes one temperature for the batch, got shape "
                     f"{np.shape(temperature)}")
  num_classes = shape[-1]
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  p_s = _tempered_probs(student_logits, temperature).reshape(-1, num_classes)
  p_t = _tempered_probs(teacher_logits, temperature).reshape(-1, num_classes)
  weights = jnp.ones(p_s.shape[:1], p_s.dtype) if mask is None else \
      _as_float(mask).reshape(-1).astype(p_s.dtype)

  def batch_sum(xs):
    totals = tuple(jnp.sum(x, axis=0) for x in xs)
    return totals if axis_name is None else jax.lax.psum(totals, axis_name)

  inter_sum, count, sum_s, sum_t = batch_sum(
      (weights * (1.0 - _pearson_over_classes(p_s, p_t)), weights, weights[:, None] * p_s,
       weights[:, None] * p_t))
  nonempty = count > 0
  safe_count = jnp.where(nonempty, count, 1.0)
  d_s = p_s - sum_s / safe_count
  d_t = p_t - sum_t / safe_count
  w = weights[:, None]
  sxy, sxx, syy = batch_sum((w * d_s * d_t, w * d_s * d_s, w * d_t * d_t))
  inter = inter_sum / safe_count
  intra = 1.0 - jnp.mean(_pearson_from_centred_sums(sxy, sxx, syy))
  temperature = _as_float(temperature)
  loss = temperature**2 * (_as_float(beta) * inter + _as_float(gamma) * intra)
  return jnp.where(nonempty, loss, 0.0)


# ------------------------------------------------------------------------------------------------
# Normalised KD (NKD).


def nkd_loss(student_logits, teacher_logits, labels, *, temperature: Scalar = 1.0,
             gamma: Scalar = 1.5) -> Array:
  """Normalized KD (NKD; Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge
  Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels",
  arXiv 2303.13005; code yzd-v/cls_KD, `mmcls/models/dis_losses/nkd.py`), per example:

    NKD = -t_y log s_y  -  gamma T^2 sum_{k != y} t_hat_k log s_hat_k,

  s = softmax(student), t = softmax(teacher) at temperature 1 (the target term), and
  s_hat, t_hat the non-target distributions: softmax over the C - 1 non-target logits divided by
  T (the target removed and the rest renormalised to sum 1). The non-target term is a
  cross-entropy, as in the authors' code; it differs from gamma T^2 KL(t_hat || s_hat) by the
  teacher's non-target entropy, a constant for the student (same gradient). The target term's
  teacher probability t_y is a constant (no gradient), and only the non-target term is scaled by
  T^2. This is the NKD term alone: the authors' distiller adds the student's ordinary
  cross-entropy (weight 1) separately, and so must the caller.

  The authors' defaults: temp = 1.0, gamma = 1.5 (the loss class, and the ImageNet configs
  `configs/distillers/imagenet/res34_distill_res18_img.py`, `res50_distill_mv1_img.py`);
  gamma = 1.0 for DeiT (`deit-s3_distill_deit-t_img.py`); temp = 3.0, gamma = 3.5 on CIFAR-100
  (`configs/distillers/cifar100/res34_distill_res18_cifar.py`). Like the authors' code, a soft
  label's target class is its argmax.

  Args:
    student_logits: [..., C] student logits, C >= 2.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C]; a soft label's target
      class y is its argmax (the first on ties).
    temperature: T > 0 for the non-target distributions, a scalar or one value per example.
    gamma: the non-target term's weight, >= 0.

  Returns:
    The NKD term per example, shape `student_logits.shape[:-1]`.
  """
  _check_pair(student_logits, teacher_logits, labels)
  _check_temperature("temperature", temperature)
  _checks.check_range("gamma", gamma, low=0.0)
  if np.shape(student_logits)[-1] < 2:
    raise ValueError(f"nkd_loss needs at least 2 classes, got shape {np.shape(student_logits)}")
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  is_target = _target_mask(student_logits, labels)

  def at_target(log_p):
    return jnp.sum(jnp.where(is_target, log_p, 0.0), axis=-1)

  log_s_target = at_target(jax.nn.log_softmax(_as_float(student_logits), axis=-1))
  t_target = jnp.exp(at_target(jax.nn.log_softmax(_as_float(teacher_logits), axis=-1)))

  def nontarget_log_probs(logits):
    scaled = _as_float(logits) / _expand_last(temperature)
    return jax.nn.log_softmax(jnp.where(is_target, scaled - _MASK_OFFSET, scaled), axis=-1)

  log_s_hat = nontarget_log_probs(student_logits)
  t_hat = jnp.exp(nontarget_log_probs(teacher_logits))
  nontarget_ce = -jnp.sum(jnp.where(is_target, 0.0, t_hat * log_s_hat), axis=-1)
  return -t_target * log_s_target + \
      _as_float(gamma) * _as_float(temperature)**2 * nontarget_ce


# ------------------------------------------------------------------------------------------------
# Transformed teacher matching: TTM and WTTM.


def _transformed_teacher(teacher_logits, gamma) -> tuple[Array, Array]:
  """(log of the power-transformed teacher p_t^gamma / U, log U), U = sum_k p_t,k^gamma."""
  powered = _expand_last(gamma) * jax.nn.log_softmax(_as_float(teacher_logits), axis=-1)
  log_norm = jax.nn.logsumexp(powered, axis=-1)
  return powered - log_norm[..., None], log_norm


def ttm_loss(student_logits, teacher_logits, *, gamma: Scalar) -> Array:
  """Transformed teacher matching (TTM; Zheng and Yang, ICLR 2024, "Knowledge Distillation Based
  on Transformed Teacher Matching", arXiv 2402.11148; code zkxufo/TTM,
  `distiller_zoo/ttm.py`), per example:

    TTM = KL(p_t^gamma / U || softmax(s)),   U = sum_k p_t,k^gamma,   p_t = softmax(t),

  KD with the temperature kept on the teacher only: the power transform p_t^gamma / U is
  softmax(t / T) with T = 1/gamma, and the student's logits are not scaled (no T^2 factor). The
  paper shows this equals KD plus a Rényi-entropy regulariser of the student. The caller adds
  the cross-entropy and the weight.

  The authors' code: `--ttm_l` (gamma) defaults to 1, which is plain KD at T = 1, hence no default
  here; their README's CIFAR-100 example (vgg13 -> vgg8) uses gamma = 0.1 with the TTM term's
  weight beta = 45 (`-b 45`) and cross-entropy weight 1 (`-r 1`). The paper's per-pair
  T = 1/gamma and beta values (its appendix A.4) were not available to us.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    gamma: the power-transform exponent gamma > 0 (= 1/T), a scalar or one value per example.

  Returns:
    The KL in nats per example, shape `student_logits.shape[:-1]`.
  """
  _checks.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _checks.check_range("gamma", gamma, low=0.0, low_inclusive=False)
  log_target, _ = _transformed_teacher(jax.lax.stop_gradient(teacher_logits), gamma)
  return _kl_from_log_probs(log_target, jax.nn.log_softmax(_as_float(student_logits), axis=-1))


def wttm_loss(student_logits, teacher_logits, *, gamma: Scalar) -> Array:
  """Weighted transformed teacher matching (WTTM; Zheng and Yang, ICLR 2024, arXiv 2402.11148;
  code zkxufo/TTM, `distiller_zoo/wttm.py`), per example:

    WTTM = U_gamma(p_t) * KL(p_t^gamma / U_gamma(p_t) || softmax(s)),
    U_gamma(p_t) = sum_k p_t,k^gamma,   p_t = softmax(t),

  `ttm_loss` weighted by the power sum of the teacher's distribution, the sample-adaptive weight
  of the paper: for gamma < 1 it lies in [1, C^(1 - gamma)] and is larger the smoother the
  teacher's distribution, so such examples count more. The weight is a constant for the student
  (the teacher gets no gradient). The caller adds the cross-entropy and the weight.

  The authors' code: `--ttm_l` (gamma) defaults to 1 (U = 1: plain KD at T = 1), hence no default
  here; their README combines WTTM (gamma = 0.2, weight `-a 4`) with CRD. The paper's per-pair
  gamma and beta values (its appendix A.4) were not available to us.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits (no gradient flows to them).
    gamma: the power-transform exponent gamma > 0 (= 1/T), a scalar or one value per example.

  Returns:
    The weighted KL per example, shape `student_logits.shape[:-1]`.
  """
  _checks.check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _checks.check_range("gamma", gamma, low=0.0, low_inclusive=False)
  log_target, log_norm = _transformed_teacher(jax.lax.stop_gradient(teacher_logits), gamma)
  kl = _kl_from_log_probs(log_target, jax.nn.log_softmax(_as_float(student_logits), axis=-1))
  return jnp.exp(log_norm) * kl


# ------------------------------------------------------------------------------------------------
# Curriculum temperature (CTKD).


@jax.custom_vjp
def _gradient_reversal(x, scale):
  return x


def _gradient_reversal_fwd(x, scale):
  return x, scale


def _gradient_reversal_bwd(scale, g):
  return (-scale * g).astype(g.dtype), jnp.zeros_like(scale)


_gradient_reversal.defvjp(_gradient_reversal_fwd, _gradient_reversal_bwd)


def gradient_reversal(x, scale: Scalar) -> Array:
  """Gradient reversal layer (Ganin and Lempitsky, ICML 2015, arXiv 1409.7495):

    forward: y = x,   backward: dL/dx = -scale * dL/dy,

  so what follows the layer is minimised while what precedes it is pushed to maximise the same
  loss (scaled by `scale`). No gradient flows to `scale`. CTKD (`ctkd_temperature`) puts it
  between the learnable temperature and the distillation loss.

  Args:
    x: any array.
    scale: the reversal's strength lambda >= 0, a number or a traced scalar (or an array that
      broadcasts against `x`).

  Returns:
    `x` unchanged (its gradient is reversed and scaled).
  """
  _checks.check_range("scale", scale, low=0.0)
  x = jnp.asarray(x)
  return _gradient_reversal(x, _as_float(scale))


def ctkd_temperature(raw_temperature_param, lambda_: Scalar, *, t_start: Scalar = 1.0,
                     t_range: Scalar = 20.0) -> Array:
  """CTKD's learnable global temperature (Li et al., AAAI 2023, "Curriculum Temperature for
  Knowledge Distillation", arXiv 2211.16231; code zhengli97/CTKD, `models/temp_global.py` and
  `helper/loops.py`):

    T = t_start + t_range * sigmoid(GRL_lambda(theta)),

  theta the raw trainable scalar, GRL_lambda the `gradient_reversal` layer with scale lambda, so
  the student minimises the distillation loss while theta is updated to maximise it (an
  adversarially hard temperature), with a strength lambda that grows over training
  (`ctkd_lambda`). Distil with `kd_loss(..., temperature=T)`: the loss's T^2 factor is
  differentiated too, as in the authors' code.

  The authors' code: theta is initialised to 1 (`nn.Parameter(torch.ones(1))`, so T starts at
  1 + 20 sigmoid(1) = 15.62), t_start = 1 and t_range = 20 (`--t_start 1 --t_end 20`; despite
  its name t_end is the range: T lies in (1, 21)); the student's loss is
  0.1 CE + 0.9 T^2 KL on CIFAR-100 (`-r 0.1 -a 0.9`, scripts/run_cifar_distill.sh) and
  1 CE + 1 T^2 KL on ImageNet (`-r 1 -a 1`, scripts/run_imagenet_distill.sh). Their gradient
  reversal multiplies the gradient by their schedule's value, which runs from 0 down to -1; here
  lambda is its magnitude, from 0 up to 1, and the layer negates it.

  Args:
    raw_temperature_param: theta, the trainable scalar (or array, one temperature each).
    lambda_: the reversal strength lambda >= 0 (`ctkd_lambda`), a number or a traced scalar.
    t_start: the lowest temperature, > 0.
    t_range: the temperatures' range, >= 0: T lies in (t_start, t_start + t_range).

  Returns:
    T, the shape of `raw_temperature_param`.
  """
  _checks.check_range("lambda_", lambda_, low=0.0)
  _checks.check_range("t_start", t_start, low=0.0, low_inclusive=False)
  _checks.check_range("t_range", t_range, low=0.0)
  reversed_param = gradient_reversal(_as_float(raw_temperature_param), lambda_)
  return _as_float(t_start) + _as_float(t_range) * jax.nn.sigmoid(reversed_param)


def ctkd_lambda(step, total_steps: int, *, max_value: Scalar = 1.0,
                min_value: Scalar = 0.0) -> Array:
  """CTKD's curriculum for the gradient-reversal strength (Li et al., AAAI 2023,
  arXiv 2211.16231; code zhengli97/CTKD, `CosineDecay` in `train_student.py`), a cosine ramp:

    lambda(step) = min_value + (max_value - min_value) (1 - cos(pi min(max(step, 0), N) / N)) / 2,

  N = `total_steps`: lambda rises from min_value at step 0 to max_value at step N and stays there.

  The authors' code evaluates it once per epoch, at the 1-based epoch number (so the first epoch
  already has lambda = (1 - cos(pi / N)) / 2), with N = `--decay_loops` = 10 epochs on CIFAR-100
  (of 240) and 5 on ImageNet (of 120), and values running from 0 to -1 (`--decay_max 0
  --decay_min -1`) that multiply the gradient; in this function's terms (magnitudes, the layer
  negates) min_value = 0 and max_value = 1. For their schedule pass step = epoch (1-based) and
  total_steps = 10; a per-step ramp over the same span is step = optimiser step and
  total_steps = 10 * steps_per_epoch.

  Args:
    step: the step (or epoch), a number or a traced integer; clipped to [0, total_steps].
    total_steps: N, the ramp's length in the same unit, an integer >= 1.
    max_value: lambda from step N on (>= 0).
    min_value: lambda at step 0 (>= 0).

  Returns:
    lambda, a float32 scalar (or the shape of `step`).
  """
  _checks.check_int("total_steps", total_steps, low=1)
  _checks.check_range("max_value", max_value, low=0.0)
  _checks.check_range("min_value", min_value, low=0.0)
  progress = jnp.clip(_as_float(step), 0.0, float(total_steps)) / float(total_steps)
  min_value = _as_float(min_value)
  return min_value + (_as_float(max_value) - min_value) * 0.5 * (1.0 - jnp.cos(jnp.pi * progress))


# ------------------------------------------------------------------------------------------------
# Attention transfer.

# F.normalize's default: a map is divided by max(|a|_2, 1e-12).
_ATTENTION_NORM_EPS = 1e-12


def attention_map(features, *, p: Scalar = 2) -> Array:
  """Activation-based spatial attention map (Zagoruyko and Komodakis, ICLR 2017, "Paying More
  Attention to Attention", arXiv 1612.03928; code szagoruyko/attention-transfer, `utils.py`):

    Q(x) = mean over channels of |f(x)|^p,  flattened over the H x W positions,
    a(x) = Q(x) / max(|Q(x)|_2, 1e-12),

  the channel mean of the p-th power of a [..., H, W, C] feature map (channels last, as in
  Flax), L2-normalised per example (the 1e-12 is `F.normalize`'s). The authors' code fixes p = 2;
  the paper also studies p = 1 and 4.

  Args:
    features: [..., H, W, C] feature maps.
    p: the power p >= 1 (a number, or a traced scalar).

  Returns:
    The normalised attention maps, shape [..., H * W].
  """
  _checks.check_range("p", p, low=1.0)
  features = _as_float(features)
  if features.ndim < 3:
    raise ValueError(f"attention_map needs [..., H, W, C] features, got shape {features.shape}")
  if _checks.is_static_number(p) and float(p) == 2.0:
    powered = jnp.square(features)
  else:
    powered = jnp.abs(features) ** _as_float(p)
  q = jnp.mean(powered, axis=-1)
  q = q.reshape(q.shape[:-2] + (-1,))
  norm = _safe_sqrt(jnp.sum(jnp.square(q), axis=-1, keepdims=True))
  return q / jnp.maximum(norm, _ATTENTION_NORM_EPS)


def attention_transfer_loss(student_features, teacher_features, *, p: Scalar = 2) -> Array:
  """Attention transfer loss (AT; Zagoruyko and Komodakis, ICLR 2017, arXiv 1612.03928; code
  szagoruyko/attention-transfer, `utils.py`), per example:

    L = mean over the H x W positions of (a_s - a_t)^2,   a = `attention_map`(f, p),

  for one pair of [..., H, W, C] feature maps; the channel counts may differ (the maps average
  over channels), the spatial sizes must match. The teacher gets no gradient.

  The authors' code (`at_loss`) takes this mean over positions and the batch, sums it over the
  matched layer groups (3 on CIFAR, 4 on ImageNet) and adds beta times that sum to the
  cross-entropy/KD loss with beta = 1e3 (`--beta 1e+3` in the README's CIFAR and ImageNet
  commands); the paper writes beta/2 times a norm, but the code has neither the 1/2 nor the norm.
  (Run on several GPUs, their per-GPU means are summed, not averaged.) The caller reduces over the
  batch and applies beta.

  Args:
    student_features: [..., H, W, C_s] student feature maps.
    teacher_features: [..., H, W, C_t] teacher feature maps (no gradient flows to them), same
      leading and spatial shape.
    p: the power p >= 1 of `attention_map`.

  Returns:
    The loss per example, shape `student_features.shape[:-3]`.
  """
  s_shape, t_shape = tuple(np.shape(student_features)), tuple(np.shape(teacher_features))
  if len(s_shape) < 3 or s_shape[:-1] != t_shape[:-1]:
    raise ValueError(f"student_features and teacher_features must be [..., H, W, C] with the same "
                     f"[..., H, W] (channels may differ), got {s_shape} and {t_shape}")
  a_s = attention_map(student_features, p=p)
  a_t = attention_map(jax.lax.stop_gradient(teacher_features), p=p)
  return jnp.mean(jnp.square(a_s - a_t), axis=-1)
