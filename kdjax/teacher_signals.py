"""Transforms of teachers' logits that define distillation arms (issue 16): label-corrected and
correct-only teachers, distillation restricted to the classes a teacher knows, mutual learning
between peers, and reliability-weighted teacher ensembles. Pure functions, importable on their own.

Conventions (as kdjax.losses, whose helpers these functions share):
  * class axis last, any leading axes (batch, replica, sequence);
  * per-example outputs, no reduction: the caller reduces (masks for padded batches, per-replica
    weights); a loss that is zero on some examples (`known_class_kd`) says so;
  * `labels` are integer class indices, shape `logits.shape[:-1]`, or soft labels (class
    probabilities, floating, shape `logits.shape`); where a function needs one class per example
    it takes the argmax class of a soft label (the first on ties), as kdjax.losses does;
  * `temperature` is a Python number (validated eagerly, > 0) or a traced scalar/per-example array;
    every distillation term is T^2 KL(target || softmax(s / T)) in nats (Hinton et al. 2015's T^2
    keeps the gradient's scale independent of T);
  * teachers and peers are targets: no gradient flows into them (stop_gradient);
  * numerically stable (log_softmax throughout; classes are removed from a softmax with the finite
    offset kdjax.losses uses, never with -inf); inputs are computed in at least float32.

Notation: s = student logits, t = teacher logits, y = label (the target class), C = number of
classes, p^T = softmax(z / T), KL(p || q) = sum_k p_k (log p_k - log q_k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import _checks
from kdjax import losses

# The public functions.
__all__ = [
    "swap_correct_logits",
    "teacher_correct_mask",
    "known_example_mask",
    "known_class_kd",
    "probability_kd_loss",
    "peer_mean_probabilities",
    "mutual_kd_loss",
    "reliability_weights",
    "weighted_ensemble_probabilities",
]

Array = jax.Array

_as_float = losses._as_float


def _check_logits(name: str, logits) -> None:
  if np.ndim(logits) < 1:
    raise ValueError(f"{name} needs a class axis (last), got a scalar")


def _check_temperature(temperature) -> None:
  _checks.check_range("temperature", temperature, low=0.0, low_inclusive=False)


def _concrete(x) -> np.ndarray | None:
  """x as a numpy array when its value is known (not traced under jit/vmap), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _member_weights_like(weights, member_logits, name: str) -> Array:
  """[M] or per-example [M, ...] (= member_logits.shape[:-1]) weights, broadcast against
  [M, ..., C]."""
  ws, ls = tuple(np.shape(weights)), tuple(np.shape(member_logits))
  w = _as_float(weights)
  if ws == ls[:1]:
    return w.reshape(ws + (1,) * (len(ls) - 1))
  if ws == ls[:-1]:
    return w[..., None]
  raise ValueError(f"{name} must have shape [M] = {ls[:1]} or {ls[:-1]} (the member axis and the "
                   f"leading axes of the logits), got {ws}")


# ------------------------------------------------------------------------------------------------
# Label-corrected and correct-only teachers.


def swap_correct_logits(teacher_logits, labels) -> Array:
  """The teacher's logits with the target class moved to the top by one swap: where the teacher's
  argmax class a differs from the label y, the logits of y and a are exchanged; every other logit,
  and every example the teacher already classifies correctly, is unchanged:

    t'_y = t_a,   t'_a = t_y,   t'_k = t_k (k not in {y, a}),   a = argmax_k t_k.

  This is the "Probability Shift" (PS) correction of Knowledge Adjustment (Wen, Lai and Qian,
  "Preparing Lessons: Improve Knowledge Distillation with Better Supervision", Neurocomputing
  2021, arXiv 1911.07471): for an example the teacher misclassifies, the probability of the
  predicted class and that of the ground-truth class are exchanged, so the maximum falls on the
  ground truth and the rest of the teacher's distribution is kept. Softmax at any temperature
  commutes with a permutation of the classes, so swapping the logits is swapping the probabilities
  of p^T for every T; the multiset of logits (and the teacher's entropy) is preserved. (Swapped
  Logit Distillation, Limantoro et al. 2025, arXiv 2504.20108, applies the same swap to the
  teacher's logits.) No code release by Wen et al. was found.

  Ties: a is the first maximal index (jnp.argmax). When the target class ties for the maximum but
  is not the first maximal index, the two swapped logits are equal: the values are unchanged and
  the target class shares the top logit (`teacher_correct_mask` counts that example incorrect).

  Args:
    teacher_logits: [..., C] teacher logits.
    labels: integer class indices [...] or class probabilities [..., C] (their argmax class is the
      target).

  Returns:
    The corrected logits, shape `teacher_logits.shape`, float32 or wider.
  """
  losses._labels_are_soft("teacher_logits", teacher_logits, "labels", labels)
  t = _as_float(teacher_logits)
  num_classes = t.shape[-1]
  target = losses._target_class(labels)
  is_target = jax.nn.one_hot(target, num_classes, dtype=bool)
  is_argmax = jax.nn.one_hot(jnp.argmax(t, axis=-1), num_classes, dtype=bool)
  t_target = jnp.take_along_axis(t, target[..., None], axis=-1)
  t_max = jnp.max(t, axis=-1, keepdims=True)
  # When argmax == target both masks select the same class and t_max == t_target: unchanged.
  return jnp.where(is_target, t_max, jnp.where(is_argmax, t_target, t))


def teacher_correct_mask(teacher_logits, labels) -> Array:
  """1.0 where the teacher's top-1 class is the label, else 0.0: the weight of the distillation
  term in the `kd_correct_only` arm, computed on the current (augmented) batch.

    m = [argmax_k t_k = y]

  Ties: argmax is the first maximal index (jnp.argmax), so an example whose target class ties for
  the maximum counts as correct only if the target is the first of the tied classes.

  Args:
    teacher_logits: [..., C] teacher logits.
    labels: integer class indices [...] or class probabilities [..., C] (their argmax class is the
      target).

  Returns:
    float32 [...], shape `teacher_logits.shape[:-1]`.
  """
  losses._labels_are_soft("teacher_logits", teacher_logits, "labels", labels)
  correct = jnp.argmax(jnp.asarray(teacher_logits), axis=-1) == losses._target_class(labels)
  return correct.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Partial distillation on the classes a teacher knows.


def _known_classes(known_classes_mask, logits) -> Array:
  km = jnp.asarray(known_classes_mask)
  if np.ndim(km) < 1 or np.shape(km)[-1] != np.shape(logits)[-1]:
    raise ValueError(f"known_classes_mask must have the class axis last with C = "
                     f"{np.shape(logits)[-1]} entries ([C], or broadcastable against the logits), "
                     f"got shape {tuple(np.shape(km))}")
  try:
    ok = np.broadcast_shapes(np.shape(km), np.shape(logits)) == tuple(np.shape(logits))
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"known_classes_mask {tuple(np.shape(km))} must broadcast to the logits' "
                     f"shape {tuple(np.shape(logits))}")
  return km != 0


def known_example_mask(labels, known_classes_mask) -> Array:
  """1.0 where the example's label is a known class (one the teacher was trained on), else 0.0.

    m = known[y]

  Args:
    labels: integer class indices [...] or class probabilities [..., C] (their argmax class is the
      label).
    known_classes_mask: [C] bool or float, nonzero = known (or an array with the class axis last
      that broadcasts against [..., C], e.g. one row per replica).

  Returns:
    float32, shape `labels.shape` for integer labels, `labels.shape[:-1]` for soft labels
    (broadcast with the mask's leading axes, if any).
  """
  km = jnp.asarray(known_classes_mask)
  if np.ndim(km) < 1:
    raise ValueError("known_classes_mask needs a class axis (last), got a scalar")
  labels = jnp.asarray(labels)
  if jnp.issubdtype(labels.dtype, jnp.floating):
    if labels.shape[-1:] != km.shape[-1:]:
      raise ValueError(f"soft labels {labels.shape} and known_classes_mask {km.shape} must have "
                       f"the same number of classes")
  elif not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices or floating class probabilities, got "
                     f"dtype {labels.dtype}")
  target = jax.nn.one_hot(losses._target_class(labels), km.shape[-1], dtype=bool)
  return jnp.any(target & (km != 0), axis=-1).astype(jnp.float32)


def known_class_kd(student_logits, teacher_logits, labels, known_classes_mask, *,
                   temperature: losses.Scalar = 1.0) -> Array:
  """Distillation restricted to the known classes K (the classes the teacher was trained on), both
  distributions renormalised over K, and only on examples whose label is in K:

    L = [y in K] * T^2 * KL(p_t^{T,K} || p_s^{T,K}),
    p_z^{T,K}_k = exp(z_k / T) / sum_{j in K} exp(z_j / T)   for k in K,  0 otherwise.

  The unknown classes are removed from both softmaxes by adding -1e30 to their logits (the finite
  offset of kdjax.losses; -inf would make 0 * inf appear in the backward pass): their
  probabilities underflow to exactly 0, so they contribute nothing to the KL, and the student's
  unknown-class logits get exactly zero gradient from this term (d L / d s_k = T (q_k - p_k) = 0
  for k not in K, with q = p_s^{T,K}, p = p_t^{T,K}). The student's full softmax over all C classes
  is left to the cross-entropy term.

  This is the old-class distillation of class-incremental learning: Learning without Forgetting
  (Li and Hoiem, ECCV 2016 / TPAMI 2017) and BiC (Wu et al., "Large Scale Incremental Learning",
  CVPR 2019, arXiv 1905.13260) distil the old model's tempered softmax over the n old classes into
  the new model's softmax over the same n classes (a cross-entropy -sum_{k in K} p_t,k log p_s,k,
  which differs from the KL by the teacher's entropy, a constant). Those methods apply it to every
  example; kdjax's arm also sets it to 0 on examples whose label is not a known class (a teacher
  has no trained answer there), so the arm is this codebase's own definition: the old-class
  renormalised KD of LwF/BiC, gated by `known_example_mask`.

  Args:
    student_logits: [..., C] student logits.
    teacher_logits: [..., C] teacher logits, same shape (no gradient flows to them).
    labels: integer class indices [...] or class probabilities [..., C] (their argmax class
      decides whether the example is known).
    known_classes_mask: [C] bool or float, nonzero = known (or an array with the class axis last
      that broadcasts against [..., C], e.g. [R, 1, C] for one class set per replica).
    temperature: T > 0, a scalar or one value per example.

  Returns:
    The per-example term in nats, shape `student_logits.shape[:-1]`; 0 where the label is not
    known (and, when no class is known, everywhere).
  """
  losses._check_pair(student_logits, teacher_logits, labels)
  _check_temperature(temperature)
  known = _known_classes(known_classes_mask, student_logits)
  temperature = _as_float(temperature)
  offset = jnp.where(known, 0.0, -losses._MASK_OFFSET)
  t = jax.lax.stop_gradient(_as_float(teacher_logits))
  log_p_t = jax.nn.log_softmax(t / losses._expand_last(temperature) + offset, axis=-1)
  log_p_s = jax.nn.log_softmax(_as_float(student_logits) / losses._expand_last(temperature)
                               + offset, axis=-1)
  kl = losses._kl_from_log_probs(log_p_t, log_p_s)
  known_example = known_example_mask(labels, known) != 0
  known_example = jnp.broadcast_to(known_example, kl.shape)
  return jnp.where(known_example, temperature**2 * kl, 0.0)


# ------------------------------------------------------------------------------------------------
# Distillation towards a probability vector: mutual learning and teacher ensembles.


def probability_kd_loss(student_logits, target_probs, *,
                        temperature: losses.Scalar = 1.0) -> Array:
  """T^2 KL(q || softmax(s / T)) per example, towards a given probability vector q (already
  tempered: the output of `peer_mean_probabilities` or `weighted_ensemble_probabilities` at the
  same T). Entries q_k = 0 contribute 0 (0 log 0 = 0). q is a target: no gradient flows into it.

  `kdjax.losses.kd_loss` takes the teacher's logits and tempers them itself; an ensemble's mixture
  q is not the softmax of any tempered logits at the same T, hence this function.

  Args:
    student_logits: [..., C] student logits.
    target_probs: [..., C] target probabilities, same shape (not checked to sum to 1).
    temperature: T > 0, a scalar or one value per example; tempers the student only.

  Returns:
    The term in nats, shape `student_logits.shape[:-1]`.
  """
  _checks.check_same_shape("student_logits", student_logits, "target_probs", target_probs)
  _check_logits("student_logits", student_logits)
  _check_temperature(temperature)
  temperature = _as_float(temperature)
  q = jax.lax.stop_gradient(_as_float(target_probs))
  log_p_s = losses._tempered_log_softmax(student_logits, temperature)
  positive = q > 0
  log_q = jnp.log(jnp.where(positive, q, 1.0))
  kl = jnp.sum(jnp.where(positive, q * (log_q - log_p_s), 0.0), axis=-1)
  return temperature**2 * kl


def _peer_weights(peer_mask, num_peers: int) -> Array:
  """peer_mask [P] -> float [P] of 0/1 (all ones when None); eager check when concrete."""
  if peer_mask is None:
    return jnp.ones((num_peers,), jnp.float32)
  if tuple(np.shape(peer_mask)) != (num_peers,):
    raise ValueError(f"peer_mask must have shape [P] = ({num_peers},), got "
                     f"{tuple(np.shape(peer_mask))}")
  host = _concrete(peer_mask)
  if host is not None and not np.any(host != 0):
    raise ValueError("peer_mask excludes every peer; at least one peer must be included")
  return (jnp.asarray(peer_mask) != 0).astype(jnp.float32)


def peer_mean_probabilities(peer_logits, peer_mask=None, *,
                            temperature: losses.Scalar = 1.0) -> Array:
  """The mean of the included peers' tempered distributions (the "ensemble of the other peers"
  target):

    q = (1 / |S|) sum_{p in S} softmax(z_p / T),   S = {p : peer_mask[p] != 0}.

  Deep Mutual Learning distils from each peer separately (`mutual_kd_loss`); this mixture is the
  alternative target in which the other K - 1 students act as one ensemble teacher (DML's "DML_e"
  comparison, Zhang et al., CVPR 2018); use it with `probability_kd_loss`.

  Args:
    peer_logits: [P, ..., C] the peers' logits (e.g. all replicas, the student among them).
    peer_mask: [P] bool or float, nonzero = included (e.g. 0 for the student itself); None
      includes every peer. A concrete mask that includes no peer is a ValueError; a traced one
      gives NaN.
    temperature: T > 0, a scalar or one value per example (shape `peer_logits.shape[1:-1]`).

  Returns:
    [..., C] probabilities, `peer_logits.shape[1:]`.
  """
  if np.ndim(peer_logits) < 2:
    raise ValueError(f"peer_logits must be [P, ..., C] (a peer axis and a class axis), got shape "
                     f"{tuple(np.shape(peer_logits))}")
  w = _peer_weights(peer_mask, np.shape(peer_logits)[0])
  # The included peers' uniform mixture: weights 1/|S| on S.
  return weighted_ensemble_probabilities(peer_logits, w / jnp.sum(w), temperature=temperature)


def mutual_kd_loss(student_logits, peer_logits, peer_mask=None, *,
                   temperature: losses.Scalar = 1.0) -> Array:
  """The Deep Mutual Learning mimicry term (Zhang, Xiang, Hospedales and Lu, "Deep Mutual
  Learning", CVPR 2018, arXiv 1706.00384; code YingZhangDUT/Deep-Mutual-Learning): the mean over
  the included peers of the KL from each peer's distribution to the student's,

    L = T^2 (1 / |S|) sum_{p in S} KL(softmax(z_p / T) || softmax(s / T)),
    S = {p : peer_mask[p] != 0}.

  DML uses the mean of the KLs to each peer, not the KL to the peers' mean distribution: for a
  cohort of K networks, network k minimises L_C + 1/(K - 1) sum_{l != k} KL(p_l || p_k) (the
  paper's K-network objective). The authors' TensorFlow code (train_models.py, `_tower_loss` and
  `kl_loss_compute`) adds KL(p_j || p_i) to network i's loss for every j != i without the 1/(K - 1)
  factor (the same objective up to that constant; they only run K = 2, where the two agree), at
  T = 1, and applies network i's gradients to network i's variables only: the peers are targets,
  hence stop_gradient here. The KL to the mean of the peers is `peer_mean_probabilities` with
  `probability_kd_loss`. DML uses T = 1 (the default; then T^2 = 1).

  Args:
    student_logits: [..., C] the student's logits.
    peer_logits: [P, ..., C] the peers' logits (no gradient flows to them); may include the
      student itself, excluded by `peer_mask`.
    peer_mask: [P] bool or float, nonzero = included; None includes every peer. A concrete mask
      that includes no peer is a ValueError; a traced one gives NaN.
    temperature: T > 0, a scalar or one value per example.

  Returns:
    The term in nats, shape `student_logits.shape[:-1]`.
  """
  _check_logits("student_logits", student_logits)
  if tuple(np.shape(peer_logits))[1:] != tuple(np.shape(student_logits)):
    raise ValueError(f"peer_logits must be [P] + student_logits.shape = [P, "
                     f"{', '.join(map(str, np.shape(student_logits)))}], got "
                     f"{tuple(np.shape(peer_logits))}")
  _check_temperature(temperature)
  temperature = _as_float(temperature)
  z = jax.lax.stop_gradient(_as_float(peer_logits))
  w = _peer_weights(peer_mask, z.shape[0])
  log_p_s = losses._tempered_log_softmax(student_logits, temperature)
  log_p_peers = jax.nn.log_softmax(z / losses._expand_last(temperature), axis=-1)
  kl = losses._kl_from_log_probs(log_p_peers, log_p_s[None])  # [P, ...]
  w = w.reshape((-1,) + (1,) * (kl.ndim - 1))
  return temperature**2 * jnp.sum(w * kl, axis=0) / jnp.sum(w)


# ------------------------------------------------------------------------------------------------
# Reliability-weighted teacher ensembles.


_RELIABILITY_MODES = ("accuracy", "softmax", "uniform")


def reliability_weights(scores, *, mode: str = "accuracy", tau: losses.Scalar = 1.0) -> Array:
  """Per-member weights of a teacher ensemble from one reliability score per member (e.g. each
  teacher's accuracy on a held-out split), summing to 1:

    mode="accuracy":  w_m = a_m / sum_j a_j             (proportional to the score; scores >= 0,
                                                         not all 0);
    mode="softmax":   w_m = softmax(a / tau)_m          (tau > 0: tau -> inf gives the uniform
                                                         ensemble, tau -> 0 the best member);
    mode="uniform":   w_m = 1 / M                       (the plain average; scores ignored).

  The choice is deliberately simple: one static weight per teacher from held-out data, so that the
  arm changes only how much each teacher counts, not how its distribution looks. Per-example
  weighting schemes (e.g. weighting each teacher by its cross-entropy on the example's label, as
  in confidence-aware multi-teacher KD) can pass per-example weights to
  `weighted_ensemble_probabilities` directly.

  Args:
    scores: [M] one score per member (accuracies in [0, 1] for "accuracy").
    mode: "accuracy", "softmax" or "uniform".
    tau: the softmax temperature, > 0 (mode="softmax" only).

  Returns:
    float32 [M] weights, non-negative, summing to 1.
  """
  _checks.check_choice("mode", mode, _RELIABILITY_MODES)
  if np.ndim(scores) != 1 or np.shape(scores)[0] < 1:
    raise ValueError(f"scores must be [M] with M >= 1, got shape {tuple(np.shape(scores))}")
  a = _as_float(scores)
  if mode == "uniform":
    return jnp.full(a.shape, 1.0 / a.shape[0], a.dtype)
  if mode == "softmax":
    _checks.check_range("tau", tau, low=0.0, low_inclusive=False)
    return jax.nn.softmax(a / _as_float(tau))
  host = _concrete(scores)
  if host is not None:
    host = host.astype(np.float64)
    if not np.all(np.isfinite(host)) or np.any(host < 0) or not np.any(host > 0):
      raise ValueError(f"mode='accuracy' needs finite scores >= 0, not all 0, got {host!r}")
  return a / jnp.sum(a)


def weighted_ensemble_probabilities(member_logits, weights, *,
                                    temperature: losses.Scalar = 1.0) -> Array:
  """The weighted mixture of the members' tempered distributions:

    q = sum_m w_m softmax(z_m / T).

  The weights are used as given (`reliability_weights` sums to 1; other weights should too, for q
  to be a distribution). With w_m = 1/M this is `kdjax.losses.ensemble_teacher_logits`'s
  "mean_probs" mixture (at T = 1). Distil from it with `probability_kd_loss` at the same T.

  Args:
    member_logits: [M, ..., C] the members' logits.
    weights: [M] one weight per member, or per-example weights of shape
      `member_logits.shape[:-1]`.
    temperature: T > 0, a scalar or one value per example (shape `member_logits.shape[1:-1]`).

  Returns:
    [..., C] probabilities, `member_logits.shape[1:]`.
  """
  if np.ndim(member_logits) < 2:
    raise ValueError(f"member_logits must be [M, ..., C] (a member axis and a class axis), got "
                     f"shape {tuple(np.shape(member_logits))}")
  _check_temperature(temperature)
  z = _as_float(member_logits)
  w = _member_weights_like(weights, z, "weights")
  probs = jax.nn.softmax(z / losses._expand_last(temperature), axis=-1)
  return jnp.sum(w * probs, axis=0)
