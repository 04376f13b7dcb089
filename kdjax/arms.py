"""Study arms: what a student replica learns from, expressed as data so that arms share a program.

An arm fixes (1) the teacher signal the student sees — its own teacher's logits on the same
augmented batch, an ensemble of teachers, uniform noise (RCD) or none —,
(2) the loss kind that turns (student logits, teacher signal, labels) into a per-example loss,
and (3) where the student's initial parameters come from. The numbers inside a loss (alpha,
temperature, label smoothing, ...) are per-replica hyperparameters (`ReplicaHParams`), so one
compiled step trains every arm of a study; `kind_loss` is the one place per loss kind.

  arm              teacher signal  loss kind         init      source
  kd               teacher         kd                config    Hinton et al. 2015; arXiv 2510.12615
  rcd              noise           kd                config    random control distillation, 2510.12615
  siddo            none            ce                teacher   same init, different data order, 2510.12615
  onehot           none            ce                fresh     plain training from a fresh init
  label_smoothing  none            ce (smoothed)     fresh     Szegedy et al. 2016, the classic control
  ensemble_kd      ensemble        kd                config    arXiv 2405.00739
  ensemble_standardized_kd
                   ensemble        standardized_kd   config    arXiv 2405.00739, Sec. 6.3
  standardized_kd  teacher         standardized_kd   config    Sun et al. CVPR 2024 (arXiv 2403.01427)
  ats              teacher         ats               config    Li et al. NeurIPS 2022 (arXiv 2210.04427)
  isats            teacher         isats             config    arXiv 2405.13078
  fgcr             teacher         fgcr              config    arXiv 2405.13078 (global class relations)
  dkd              teacher         dkd               config    Zhao et al. CVPR 2022 (arXiv 2203.08679)
  feature_hint     teacher         feature_hint      config    FitNets (arXiv 1412.6550); 2510.12615

Ensembles (arXiv 2405.00739 and its released code): the loss of a replica that learns from an
ensemble of M teachers is the mean of its loss kind against each member,
  L(s, {t_m}, y) = (1/M) sum_m L_kind(s, t_m, y),
which for 'kd' equals (1 - alpha) CE + alpha T^2 KL(mean_m softmax(t_m / T) || softmax(s / T))
up to a constant that does not depend on the student (the members' mean cross-entropy is the
cross-entropy of their mixture), and for 'standardized_kd' z-scores each member on its own. The
members are the replica's (`ensemble_index`, kdjax.replicas: every teacher of its teacher model
unless `ensembles` names compositions).

Teachers train with the 'ce' loss kind, or with 'regt' (`losses.regt_loss`, arXiv 2405.13078)
when `arm_options.teacher_loss` is 'regt': RegT changes the teacher, not the student's loss, so it
is a study-wide option (a study of RegT teachers), not an arm.

`init`: 'teacher' = the initial parameters of the replica's teacher (self-distillation with
identical initialisation, arXiv 2510.12615), 'fresh' = a new draw from the replica's own seed,
'config' = `config.student_init` ('teacher' in configs/default.py).

Loss weights. A loss with a teacher term is w_ce * CE + w_kd * (teacher term). By default
(w_ce, w_kd) = (1 - alpha, alpha) for the kd, standardized_kd, fgcr kinds (Hinton's form) and
(1, 1) for dkd (CE + DKD) and (1, hint_weight) for feature_hint, as before. An arm listed in
`arm_options.ce_weight` and `arm_options.kd_weight` ("ARM=W,...") gets those two weights instead
(mdistiller's CE_WEIGHT / KD_WEIGHT convention; the logit-standardisation authors train with
0.1 / 9), and alpha is not used by it. The default config lists ats=0.5 and isats=0.5 in both:
the ATS authors' (1 - lamb) CE + lamb KD with lamb = 0.5 (lxcnju/ATS-LargeKD, distill.py), and
ats / isats soften the student at `arm_options.ats_student_temperature` (their s_tau = 1), not
at the study temperature. Outside a KD window (`kd_windows`) the teacher term is off: w_kd = 0,
and w_ce is 1 in the alpha form, ce_weight otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax
import jax
import jax.numpy as jnp

from kdjax import losses

TEACHER_SIGNALS = ("none", "teacher", "ensemble", "noise")
LOSS_KINDS = ("ce", "kd", "standardized_kd", "ats", "isats", "dkd", "feature_hint", "fgcr",
              "regt")  # regt: the teachers' loss when arm_options.teacher_loss = 'regt'


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  teacher_signal: str
  loss: str
  init: str
  description: str


ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("kd", "teacher", "kd", "config", "distillation from the replica's own teacher"),
    Arm("rcd", "noise", "kd", "config", "distillation from uniform noise (random control)"),
    Arm("siddo", "none", "ce", "teacher", "labels only, same init as the teacher, own data order"),
    Arm("onehot", "none", "ce", "fresh", "labels only, fresh init"),
    Arm("label_smoothing", "none", "ce", "fresh", "smoothed labels, fresh init"),
    Arm("ensemble_kd", "ensemble", "kd", "config", "distillation from the teachers' ensemble"),
    Arm("ensemble_standardized_kd", "ensemble", "standardized_kd", "config",
        "distillation from the teachers' ensemble between z-scored logits"),
    Arm("standardized_kd", "teacher", "standardized_kd", "config",
        "distillation between z-scored logits"),
    Arm("ats", "teacher", "ats", "config", "asymmetric temperature scaling of the teacher"),
    Arm("isats", "teacher", "isats", "config", "per-example temperature maximising non-target "
        "variance"),
    Arm("fgcr", "teacher", "fgcr", "config", "distillation from the teacher's distribution fused "
        "with its class relations on the train split"),
    Arm("dkd", "teacher", "dkd", "config", "decoupled KD: target and non-target terms"),
    Arm("feature_hint", "teacher", "feature_hint", "config",
        "labels plus FitNets matching of an intermediate feature map"),
]}


def uses_teacher(arm_names: Sequence[str]) -> bool:
  return any(ARMS[a].teacher_signal in ("teacher", "ensemble") for a in arm_names)


@flax.struct.dataclass
class ReplicaHParams:
  """Per-replica loss hyperparameters; under vmap each leaf has a leading replica axis.

  `kd_start`/`kd_stop` are the steps between which the teacher term is on (alpha is 0 outside:
  one-hot -> KD -> one-hot switching, arXiv 2301.12923); `teacher_index` picks the replica's
  teacher, `ensemble_index` [M] its ensemble's members and `ensemble_weight` [M] their weights
  (1/M; 0 on padding when ensembles differ in size); `fixed_weights` 1 means the loss weights are
  `ce_weight`, `kd_weight` (the arm's `arm_options.ce_weight` / `kd_weight`), 0 the arm's default
  form (module docstring); the rest are the losses' arguments. The three weight fields default to
  the default form, for callers that build hyperparameters by hand.
  """
  alpha: jax.Array
  temperature: jax.Array
  label_smoothing: jax.Array
  kd_start: jax.Array
  kd_stop: jax.Array
  teacher_index: jax.Array
  ensemble_index: jax.Array
  ensemble_weight: jax.Array
  ce_weight: jax.Array = 0.0
  kd_weight: jax.Array = 0.0
  fixed_weights: jax.Array = 0.0


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """Study-wide (static) settings of the loss kinds, from `config.arm_options`.

  ats / isats: the teacher's target temperature tau_1, the ats non-target temperature tau_2, the
  isats search grid of tau_2, and the student's temperature (the ATS authors' s_tau = 1; the
  study temperature is not used by these two arms). `dkd_warmup_steps`: the DKD term rises
  linearly to full strength over these steps (kdjax.study converts `dkd_warmup_epochs`, 20 as in
  mdistiller, to steps)."""
  ats_target_temperature: float = 4.0
  ats_nontarget_temperature: float = 2.0
  ats_student_temperature: float = 1.0
  isats_target_temperature: float = 4.0
  isats_temperatures: tuple[float, ...] = losses.ISATS_TEMPERATURES
  dkd_alpha: float = 1.0
  dkd_beta: float = 8.0
  dkd_warmup_steps: int = 0
  hint_feature: str = "block1"
  hint_weight: float = 1.0
  rcd_minval: float = 0.0
  rcd_maxval: float = 1.0
  fgcr_fusion: float = 0.5
  teacher_loss: str = "ce"  # 'ce' | 'regt': how the teacher stage trains (arXiv 2405.13078)
  regt_weight: float = 0.05


def effective_alpha(hp: ReplicaHParams, step) -> jax.Array:
  """alpha while kd_start <= step < kd_stop, else 0, as `losses.switch_schedule` composes it."""
  return hp.alpha * _window(hp, step)


def _window(hp: ReplicaHParams, step) -> jax.Array:
  """1.0 while kd_start <= step < kd_stop (the teacher term is on), else 0.0."""
  window = losses.switch_schedule(hp.kd_start, before=0.0, after=losses.switch_schedule(
      hp.kd_stop, before=1.0, after=0.0))
  return window(step)


def loss_weights(hp: ReplicaHParams, step, *, default_ce=None, default_kd=None):
  """(w_ce, w_kd) of one replica at `step` (module docstring, "Loss weights"): the arm's
  ce_weight / kd_weight when it has them, else (default_ce, default_kd), which default to the
  alpha form (1 - alpha_eff, alpha_eff); w_kd is 0 outside the KD window."""
  window = _window(hp, step)
  alpha = hp.alpha * window
  default_ce = 1.0 - alpha if default_ce is None else default_ce
  default_kd = alpha if default_kd is None else default_kd * window
  fixed = jnp.asarray(hp.fixed_weights) > 0
  return (jnp.where(fixed, hp.ce_weight, default_ce),
          jnp.where(fixed, hp.kd_weight * window, default_kd))


def kind_loss(kind: str, student_logits, teacher_logits, labels, hp: ReplicaHParams, step,
              options: LossOptions, *, student_features=None, teacher_features=None,
              class_relations=None) -> jax.Array:
  """Per-example loss of one loss kind for one replica (teacher_logits may be None for 'ce' and
  'regt'; `class_relations` [C, C] is the replica's teacher's, needed by 'fgcr')."""
  if kind == "ce":
    return losses.softmax_cross_entropy(student_logits, labels,
                                        label_smoothing=hp.label_smoothing)
  if kind == "regt":  # a teacher's own training loss: `student_logits` are the teacher's
    return losses.regt_loss(student_logits, labels, weight=options.regt_weight)
  if kind in ("dkd", "feature_hint"):
    ce_w, kd_w = loss_weights(hp, step, default_ce=1.0, default_kd=(
        1.0 if kind == "dkd" else options.hint_weight))
    ce = losses.softmax_cross_entropy(student_logits, labels)
    if kind == "dkd":
      # mdistiller: min(epoch / WARMUP, 1) DKD; here linear in steps (kdjax.study converts).
      warmup = jnp.minimum(1.0, (step + 1) / max(options.dkd_warmup_steps, 1))
      return ce_w * ce + kd_w * warmup * losses.dkd_loss(
          student_logits, teacher_logits, labels, alpha=options.dkd_alpha,
          beta=options.dkd_beta, temperature=hp.temperature)
    return ce_w * ce + kd_w * losses.feature_hint_loss(student_features, teacher_features)
  ce_w, kd_w = loss_weights(hp, step)
  weights = dict(ce_weight=ce_w, kd_weight=kd_w)
  if kind == "kd":
    return losses.kd_loss(student_logits, teacher_logits, labels, temperature=hp.temperature,
                          **weights)
  if kind == "standardized_kd":
    # Sun et al.: cross-entropy on the raw student logits, KL between z-scored logits.
    return losses.standardized_kd_loss(student_logits, teacher_logits, labels,
                                       temperature=hp.temperature, **weights)
  if kind == "ats":
    return losses.ats_kd_loss(student_logits, teacher_logits, labels,
                              target_temperature=options.ats_target_temperature,
                              nontarget_temperature=options.ats_nontarget_temperature,
                              temperature=options.ats_student_temperature, **weights)
  if kind == "isats":
    return losses.isats_kd_loss(student_logits, teacher_logits, labels,
                                target_temperature=options.isats_target_temperature,
                                temperatures=options.isats_temperatures,
                                temperature=options.ats_student_temperature, **weights)
  if kind == "fgcr":
    return losses.fgcr_kd_loss(student_logits, teacher_logits, labels, class_relations,
                               fusion=options.fgcr_fusion, temperature=hp.temperature, **weights)
  raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
