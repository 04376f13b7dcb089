"""Study arms: what a student replica learns from, expressed as data so that arms share a program.

An arm fixes (1) the teacher signal the student sees — its own teacher's logits on the same
augmented batch (possibly corrected or calibrated), an ensemble of teachers, its cohort's
peers, uniform noise (RCD) or none (`TeacherSignal`, in `TEACHER_SIGNALS`) —,
(2) the loss kind that turns (student logits, teacher signal, labels) into a per-example loss,
and (3) where the student's initial parameters come from. The numbers inside a loss (alpha,
temperature, label smoothing, ...) are per-replica hyperparameters (`ReplicaHParams`), so one
compiled step trains every arm of a study. Each loss kind is one record (`LossKind`, in
`LOSS_KINDS`): its loss function, the `arm_options` it reads and what it needs from the engine.

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
  nkd              teacher         nkd               config    Yang et al. ICCV 2023 (arXiv 2303.13005)
  dist             teacher         dist              config    Huang et al. NeurIPS 2022 (arXiv 2205.10536)
  ttm, wttm        teacher         ttm, wttm         config    Zheng and Yang ICLR 2024 (arXiv 2402.11148)
  attention_transfer
                   teacher         attention_transfer config   Zagoruyko and Komodakis ICLR 2017
  ctkd             teacher         ctkd              config    Li et al. AAAI 2023 (arXiv 2211.16231)
  kd_correct_only  teacher         kd_correct_only   config    kdjax's control for error transfer
  kd_corrected     corrected_teacher kd              config    Wen et al. (arXiv 1911.07471)
  kd_calibrated    calibrated_teacher kd             config    Guo et al. ICML 2017 (temperature scaling)
  ensemble_kd_reliable
                   reliable_ensemble kd              config    members weighted by validation reliability
  kd_known         teacher         known_kd          config    partial distillation (teacher_classes)
  mutual           peers           mutual            fresh     Zhang et al. CVPR 2018 (deep mutual learning)

Ensembles (arXiv 2405.00739 and its released code): the loss of a replica that learns from an
ensemble of M teachers is the mean of its loss kind against each member,
  L(s, {t_m}, y) = (1/M) sum_m L_kind(s, t_m, y),
which for 'kd' equals (1 - alpha) CE + alpha T^2 KL(mean_m softmax(t_m / T) || softmax(s / T))
up to a constant that does not depend on the student (the members' mean cross-entropy is the
cross-entropy of their mixture), and for 'standardized_kd' z-scores each member on its own. The
members are the replica's (`member_slots`, kdjax.replicas: every teacher of its teacher model
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
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax import teacher_signals

@dataclasses.dataclass(frozen=True)
class TeacherSignal:
  """Where a replica's teacher logits come from; kdjax.engine computes them on the replica's own
  augmented batch from `source`: "none" (no teacher term), "noise" (RCD's uniform logits),
  "teacher" (the replica's own trained teacher), "ensemble" (its ensemble's members) or "peers"
  (its cohort's logits on the current step: mutual learning). With several members (ensemble,
  peers; `ReplicaHParams.member_slots`) the logits have a leading member axis and the loss is
  the `member_weights`-weighted mean of the loss kind against each member (module docstring,
  "Ensembles"). `transform(logits, labels, teachers, hp)` changes the teacher's logits before
  the loss (a corrected or calibrated teacher). `needs`: "validation" when it needs the
  validation split (`val_fraction`; the teachers' temperatures and reliabilities are fitted on
  it). `reliability_weighted`: the members' weights are their teachers' reliability scores on
  the validation split (`Teachers.reliability`), normalised over the replica's members,
  instead of `member_weights`. `options`: the `LossOptions` fields it reads."""
  name: str
  description: str
  source: str = "none"
  transform: Callable | None = None
  needs: frozenset[str] = frozenset()
  reliability_weighted: bool = False
  options: tuple[str, ...] = ()

  @property
  def reads(self) -> str:
    """The trained teachers it reads: "teacher", "ensemble" or "" (none)."""
    return self.source if self.source in ("teacher", "ensemble") else ""

  @property
  def members(self) -> bool:
    """Whether its logits have a member axis (ensemble members, cohort peers)."""
    return self.source in ("ensemble", "peers")


def _swap_correct(logits, labels, teachers, hp) -> jax.Array:
  del teachers, hp
  return teacher_signals.swap_correct_logits(logits, labels)


def _calibrate(logits, labels, teachers, hp) -> jax.Array:
  del labels
  return logits / teachers.temperatures[hp.teacher_slot]


TEACHER_SIGNALS: dict[str, TeacherSignal] = {s.name: s for s in [
    TeacherSignal("none", "no teacher term (labels only)"),
    TeacherSignal("teacher", "the replica's own teacher", source="teacher"),
    TeacherSignal("ensemble", "the members of the replica's teacher ensemble",
                  source="ensemble"),
    TeacherSignal("noise", "uniform noise logits (random control distillation)",
                  source="noise", options=("rcd_minval", "rcd_maxval")),
    # Wen et al., "Preparing Lessons: Improve Knowledge Distillation with Better Supervision"
    # (arXiv 1911.07471), knowledge adjustment by probability shift:
    # kdjax.teacher_signals.swap_correct_logits.
    TeacherSignal("corrected_teacher", "the replica's own teacher with, where it is wrong on the "
                  "batch, the true class's and its top class's logits swapped",
                  source="teacher", transform=_swap_correct),
    # Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017): the teacher's logits
    # divided by its temperature fitted on the validation split (kdjax.calibration).
    TeacherSignal("calibrated_teacher", "the replica's own teacher after post-hoc temperature "
                  "scaling on the validation split", source="teacher", transform=_calibrate,
                  needs=frozenset({"validation"})),
    # A reliability-weighted teacher ensemble: member m weighted by its validation accuracy
    # (or calibrated confidence; arm_options.ensemble_reliability), w_m = a_m / sum_j a_j
    # (kdjax.teacher_signals.reliability_weights, mode "accuracy").
    TeacherSignal("reliable_ensemble", "the members of the replica's teacher ensemble, each "
                  "weighted by its reliability on the validation split", source="ensemble",
                  needs=frozenset({"validation"}), reliability_weighted=True,
                  options=("ensemble_reliability",)),
    # Zhang et al., "Deep Mutual Learning" (CVPR 2018): the other members of the replica's
    # cohort, their logits on this step's shared batch before anyone's update.
    TeacherSignal("peers", "the other students of the replica's cohort on the same batch",
                  source="peers"),
]}


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  teacher_signal: str
  loss: str
  init: str
  description: str

  @property
  def reads(self) -> str:
    """The trained teachers it learns from: "teacher", "ensemble" or "" (TeacherSignal.reads)."""
    return TEACHER_SIGNALS[self.teacher_signal].reads


ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("kd", "teacher", "kd", "config", "distillation from the replica's own teacher"),
    Arm("rcd", "noise", "kd", "config", "distillation from uniform noise (random control)"),
    Arm("siddo", "none", "ce", "teacher", "labels only, same init as the teacher, own data order"),
    Arm("onehot", "none", "ce", "fresh", "labels only, fresh init"),
    Arm("label_smoothing", "none", "ce", "fresh", "smoothed labels, fresh init"),
    Arm("ensemble_kd", "ensemble", "kd", "config", "distillation from the teachers' ensemble"),
    Arm("ensemble_kd_reliable", "reliable_ensemble", "kd", "config",
        "distillation from the teachers' ensemble, members weighted by validation accuracy"),
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
    Arm("nkd", "teacher", "nkd", "config", "normalized KD: the teacher's target probability and "
        "its normalised non-target distribution"),
    Arm("dist", "teacher", "dist", "config", "DIST: Pearson correlation of the distributions "
        "across classes and of each class across the batch"),
    Arm("ttm", "teacher", "ttm", "config", "transformed teacher matching: the temperature on "
        "the teacher only"),
    Arm("wttm", "teacher", "wttm", "config", "TTM weighted per example by the smoothness of the "
        "teacher's distribution"),
    Arm("attention_transfer", "teacher", "attention_transfer", "config",
        "labels plus matching of the teacher's spatial attention maps"),
    Arm("kd_correct_only", "teacher", "kd_correct_only", "config",
        "kd with the teacher term off on examples the teacher gets wrong on the batch"),
    Arm("kd_corrected", "corrected_teacher", "kd", "config",
        "kd from the teacher made right: true class and top class swapped where it is wrong"),
    Arm("kd_calibrated", "calibrated_teacher", "kd", "config",
        "kd from the teacher temperature-scaled on the validation split"),
    Arm("ctkd", "teacher", "ctkd", "config",
        "kd at a learned temperature trained adversarially through gradient reversal"),
    Arm("kd_known", "teacher", "known_kd", "config",
        "kd on the classes the teacher was trained on (renormalised), labels alone elsewhere"),
    Arm("mutual", "peers", "mutual", "fresh",
        "deep mutual learning: labels plus the mean KL to each cohort peer, no teacher"),
]}


def uses_teacher(arm_names: Sequence[str]) -> bool:
  """Whether any of the arms learns from the trained teachers."""
  return any(ARMS[a].reads for a in arm_names)


@flax.struct.dataclass
class ReplicaHParams:
  """Per-replica loss hyperparameters; under vmap each leaf has a leading replica axis.

  `kd_start`/`kd_stop` are the steps between which the teacher term is on (alpha is 0 outside:
  one-hot -> KD -> one-hot switching, arXiv 2301.12923); `teacher_slot` is the position of the
  replica's teacher among the teachers its program is given (`Teachers`, in
  `Group.teacher_indices` order; not the teacher stage's replica index, `Replica.teacher`),
  `member_slots` [M] those of its ensemble's members and `member_weights` [M] their weights
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
  teacher_slot: jax.Array
  member_slots: jax.Array
  member_weights: jax.Array
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
  # The logit baselines, defaults from the authors' code (kdjax.losses, each function's
  # docstring): NKD's loss class (temp 1, gamma 1.5); DIST's (tau 1, beta = gamma = 1, weight 2
  # next to CE 1 in every config); TTM's and WTTM's README examples (gamma 0.1, weight 45;
  # gamma 0.2, weight 4); attention transfer's beta = 1e3 over the matched layer groups.
  nkd_temperature: float = 1.0
  nkd_gamma: float = 1.5
  dist_temperature: float = 1.0
  dist_beta: float = 1.0
  dist_gamma: float = 1.0
  dist_weight: float = 2.0
  ttm_gamma: float = 0.1
  ttm_weight: float = 45.0
  wttm_gamma: float = 0.2
  wttm_weight: float = 4.0
  at_features: tuple[str, ...] = ("block1", "block2")
  at_weight: float = 1000.0
  # Deep mutual learning (Zhang et al. CVPR 2018; YingZhangDUT/Deep-Mutual-Learning): cohorts
  # of `mutual_cohort` students (the paper's main setting: 2) that share their batches; each
  # learns CE + the mean over its peers of KL(p_peer || p_self) at `mutual_temperature` (T = 1,
  # no T^2 factor then; the authors' code).
  mutual_cohort: int = 2
  mutual_temperature: float = 1.0
  # The classes the teachers were trained on (config `teacher_classes`; () = all), for the
  # known_kd kind: it distils on those classes only.
  known_classes: tuple[int, ...] = ()
  # What weighs a member of a reliability-weighted ensemble: "accuracy" (its accuracy on the
  # validation split) or "confidence" (its mean top probability there after temperature
  # scaling).
  ensemble_reliability: str = "accuracy"
  # CTKD (Li et al. AAAI 2023; zhengli97/CTKD): T = ctkd_t_start + ctkd_t_range *
  # sigmoid(GRL_lambda(theta)), theta trainable from ctkd_init, lambda rising as a cosine from 0
  # to ctkd_max_lambda over ctkd_ramp_epochs epochs, evaluated per epoch at the 1-based epoch
  # (their CIFAR-100 defaults: 1, 20, 1, 1, 10); `ctkd_steps_per_epoch` is the students'
  # (kdjax.study sets it).
  ctkd_t_start: float = 1.0
  ctkd_t_range: float = 20.0
  ctkd_init: float = 1.0
  ctkd_max_lambda: float = 1.0
  ctkd_ramp_epochs: int = 10
  ctkd_steps_per_epoch: int = 1


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


@flax.struct.dataclass
class LossInputs:
  """What a loss kind reads for one replica on one batch (under vmap each leaf has a leading
  replica axis). `teacher_logits` is one teacher's (an ensemble's member at a time), None for
  kinds without a teacher term; `student_features` / `teacher_features` {name: feature map} of
  the features the kinds ask for (`LossKind.features`); `class_relations` [C, C] the replica's
  teacher's (kinds that need "class_relations"); `mask` [B] 1 on real and 0 on padded examples
  and `data_axis` the mesh axis the batch is split over (None: unsplit), for batch-level losses
  (DIST); `learned_temperature` the replica's trainable temperature parameter (kinds that need
  "learned_temperature": kdjax.engine adds it to the replica's parameters)."""
  student_logits: jax.Array
  labels: jax.Array
  teacher_logits: jax.Array | None = None
  student_features: dict | None = None
  teacher_features: dict | None = None
  class_relations: jax.Array | None = None
  mask: jax.Array | None = None
  data_axis: str | None = flax.struct.field(pytree_node=False, default=None)
  learned_temperature: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LossKind:
  """One loss kind, in one place: `loss(inputs, hp, step, options)` is its per-example loss
  (kdjax.losses conventions), `options` the `LossOptions` fields it reads, `needs` what the
  engine must give it beyond logits and labels ("class_relations": the teacher's class
  relations on the train split; "features" when `features` is set), and `reference` where it
  comes from. `features(options)` names the feature maps it matches between student and teacher
  and `feature_match` what must agree between the two models' maps: "shape" (all of it) or
  "spatial" ([..., H, W]; channels may differ). The engine, the stage loop and validation ask
  about these, never about a kind's name. `grid`: the study grid axes its loss reads, "alpha"
  (its alpha form of the weights; not read by an arm with fixed weights) and "temperature"
  (the study temperature): a replica table expands an arm only over the axes its kind reads
  (kdjax.replicas), so a grid never trains identical replicas under different labels."""
  name: str
  loss: Callable[[LossInputs, ReplicaHParams, Any, LossOptions], jax.Array]
  reference: str
  options: tuple[str, ...] = ()
  needs: frozenset[str] = frozenset()
  grid: frozenset[str] = frozenset()
  features: Callable[[LossOptions], tuple[str, ...]] | None = None
  feature_match: str = "shape"

  def __post_init__(self):
    if self.features is not None and "features" not in self.needs:
      object.__setattr__(self, "needs", self.needs | {"features"})


def _ce_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  del step, options
  return losses.softmax_cross_entropy(i.student_logits, i.labels,
                                      label_smoothing=hp.label_smoothing)


def _regt_kind(i: LossInputs, hp, step, options: LossOptions) -> jax.Array:
  del hp, step  # a teacher's own training loss: `student_logits` are the teacher's
  return losses.regt_loss(i.student_logits, i.labels, weight=options.regt_weight)


def _kd_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  del options
  ce_w, kd_w = loss_weights(hp, step)
  return losses.kd_loss(i.student_logits, i.teacher_logits, i.labels,
                        temperature=hp.temperature, ce_weight=ce_w, kd_weight=kd_w)


def _standardized_kd_kind(i: LossInputs, hp: ReplicaHParams, step, options) -> jax.Array:
  # Sun et al.: cross-entropy on the raw student logits, KL between z-scored logits.
  del options
  ce_w, kd_w = loss_weights(hp, step)
  return losses.standardized_kd_loss(i.student_logits, i.teacher_logits, i.labels,
                                     temperature=hp.temperature, ce_weight=ce_w, kd_weight=kd_w)


def _ats_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  ce_w, kd_w = loss_weights(hp, step)
  return losses.ats_kd_loss(i.student_logits, i.teacher_logits, i.labels,
                            target_temperature=options.ats_target_temperature,
                            nontarget_temperature=options.ats_nontarget_temperature,
                            temperature=options.ats_student_temperature,
                            ce_weight=ce_w, kd_weight=kd_w)


def _isats_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  ce_w, kd_w = loss_weights(hp, step)
  return losses.isats_kd_loss(i.student_logits, i.teacher_logits, i.labels,
                              target_temperature=options.isats_target_temperature,
                              temperatures=options.isats_temperatures,
                              temperature=options.ats_student_temperature,
                              ce_weight=ce_w, kd_weight=kd_w)


def _fgcr_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  ce_w, kd_w = loss_weights(hp, step)
  return losses.fgcr_kd_loss(i.student_logits, i.teacher_logits, i.labels, i.class_relations,
                             fusion=options.fgcr_fusion, temperature=hp.temperature,
                             ce_weight=ce_w, kd_weight=kd_w)


def _dkd_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  # CE + DKD (weights (1, 1) by default); mdistiller ramps DKD by min(epoch / WARMUP, 1), here
  # linearly in steps (kdjax.study converts the epochs).
  ce_w, kd_w = loss_weights(hp, step, default_ce=1.0, default_kd=1.0)
  warmup = jnp.minimum(1.0, (step + 1) / max(options.dkd_warmup_steps, 1))
  return ce_w * losses.softmax_cross_entropy(i.student_logits, i.labels) + \
      kd_w * warmup * losses.dkd_loss(i.student_logits, i.teacher_logits, i.labels,
                                      alpha=options.dkd_alpha, beta=options.dkd_beta,
                                      temperature=hp.temperature)


def _feature_hint_kind(i: LossInputs, hp: ReplicaHParams, step, options) -> jax.Array:
  ce_w, kd_w = loss_weights(hp, step, default_ce=1.0, default_kd=options.hint_weight)
  name = options.hint_feature
  return ce_w * losses.softmax_cross_entropy(i.student_logits, i.labels) + \
      kd_w * losses.feature_hint_loss(i.student_features[name], i.teacher_features[name])


def _labels_plus(i: LossInputs, hp: ReplicaHParams, step, weight: float, term) -> jax.Array:
  """w_ce CE + w_kd term with (w_ce, w_kd) = (1, `weight`) unless the arm has fixed weights:
  the form of the methods that add their term to the plain cross-entropy."""
  ce_w, kd_w = loss_weights(hp, step, default_ce=1.0, default_kd=weight)
  return ce_w * losses.softmax_cross_entropy(i.student_logits, i.labels) + kd_w * term


def _nkd_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  # The authors' distiller: CE + NKD, both weight 1.
  return _labels_plus(i, hp, step, 1.0, losses.nkd_loss(
      i.student_logits, i.teacher_logits, i.labels, temperature=options.nkd_temperature,
      gamma=options.nkd_gamma))


def _dist_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  # A batch-level loss: every example carries the batch's value, so the engine's masked mean
  # over the batch (summed over data shards) is CE's mean plus it.
  batch = losses.dist_loss(i.student_logits, i.teacher_logits, mask=i.mask,
                           beta=options.dist_beta, gamma=options.dist_gamma,
                           temperature=options.dist_temperature, axis_name=i.data_axis)
  term = jnp.broadcast_to(batch, i.student_logits.shape[:-1])
  return _labels_plus(i, hp, step, options.dist_weight, term)


def _ttm_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  return _labels_plus(i, hp, step, options.ttm_weight, losses.ttm_loss(
      i.student_logits, i.teacher_logits, gamma=options.ttm_gamma))


def _wttm_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  return _labels_plus(i, hp, step, options.wttm_weight, losses.wttm_loss(
      i.student_logits, i.teacher_logits, gamma=options.wttm_gamma))


def _attention_transfer_kind(i: LossInputs, hp: ReplicaHParams, step, options) -> jax.Array:
  # The authors' code: CE + beta * sum over the matched layer groups of the AT loss.
  term = sum(losses.attention_transfer_loss(i.student_features[n], i.teacher_features[n])
             for n in options.at_features)
  return _labels_plus(i, hp, step, options.at_weight, term)


def _mutual_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  # One peer's term; the engine averages it over the cohort's other members (member_weights).
  t = options.mutual_temperature
  term = t**2 * losses.kl_divergence(i.teacher_logits, i.student_logits, temperature=t)
  return _labels_plus(i, hp, step, 1.0, term)


def _known_kd_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  # Partial distillation: on an example of a class the teacher knows, w_ce CE + w_kd T^2 KL
  # between teacher and student renormalised over the known classes; on the others CE alone.
  ce_w, kd_w = loss_weights(hp, step)
  known = jnp.zeros(i.student_logits.shape[-1], bool).at[jnp.asarray(options.known_classes)].set(
      True)
  on_known = teacher_signals.known_example_mask(i.labels, known)
  ce = losses.softmax_cross_entropy(i.student_logits, i.labels)
  kd_term = teacher_signals.known_class_kd(i.student_logits, i.teacher_logits, i.labels, known,
                                           temperature=hp.temperature)
  return jnp.where(on_known > 0, ce_w * ce + kd_w * kd_term, ce)


def _ctkd_kind(i: LossInputs, hp: ReplicaHParams, step, options: LossOptions) -> jax.Array:
  # kd at the learned temperature; theta receives the reversed gradient of the KD term (and of
  # its T^2 factor, as in the authors' code).
  epoch = step // options.ctkd_steps_per_epoch + 1
  lambda_ = losses.ctkd_lambda(epoch, options.ctkd_ramp_epochs,
                               max_value=options.ctkd_max_lambda)
  temperature = losses.ctkd_temperature(i.learned_temperature, lambda_,
                                        t_start=options.ctkd_t_start,
                                        t_range=options.ctkd_t_range)
  ce_w, kd_w = loss_weights(hp, step)
  return losses.kd_loss(i.student_logits, i.teacher_logits, i.labels, temperature=temperature,
                        ce_weight=ce_w, kd_weight=kd_w)


def _kd_correct_only_kind(i: LossInputs, hp: ReplicaHParams, step, options) -> jax.Array:
  # kd with the teacher term multiplied by 1[argmax teacher = label] on this (augmented) batch.
  del options
  ce_w, kd_w = loss_weights(hp, step)
  correct = teacher_signals.teacher_correct_mask(i.teacher_logits, i.labels)
  kd_term = losses.kd_loss(i.student_logits, i.teacher_logits, i.labels,
                           temperature=hp.temperature, ce_weight=0.0, kd_weight=1.0)
  return ce_w * losses.softmax_cross_entropy(i.student_logits, i.labels) + \
      kd_w * correct * kd_term


LOSS_KINDS: dict[str, LossKind] = {k.name: k for k in [
    LossKind("ce", _ce_kind, "cross-entropy on the labels (label smoothing: Szegedy et al. 2016)"),
    LossKind("kd", _kd_kind, "Hinton et al. 2015", grid=frozenset({"alpha", "temperature"})),
    LossKind("standardized_kd", _standardized_kd_kind, "Sun et al. CVPR 2024 (arXiv 2403.01427)",
             grid=frozenset({"alpha", "temperature"})),
    LossKind("ats", _ats_kind, "Li et al. NeurIPS 2022 (arXiv 2210.04427)",
             options=("ats_target_temperature", "ats_nontarget_temperature",
                      "ats_student_temperature"), grid=frozenset({"alpha"})),
    LossKind("isats", _isats_kind, "arXiv 2405.13078",
             options=("isats_target_temperature", "isats_temperatures",
                      "ats_student_temperature"), grid=frozenset({"alpha"})),
    LossKind("dkd", _dkd_kind, "Zhao et al. CVPR 2022 (arXiv 2203.08679)",
             options=("dkd_alpha", "dkd_beta", "dkd_warmup_steps"),
             grid=frozenset({"temperature"})),
    LossKind("feature_hint", _feature_hint_kind, "FitNets (arXiv 1412.6550)",
             options=("hint_feature", "hint_weight"),
             features=lambda o: (o.hint_feature,)),
    LossKind("nkd", _nkd_kind, "Yang et al. ICCV 2023 (arXiv 2303.13005), yzd-v/cls_KD",
             options=("nkd_temperature", "nkd_gamma")),
    LossKind("dist", _dist_kind, "Huang et al. NeurIPS 2022 (arXiv 2205.10536), hunto/DIST_KD",
             options=("dist_temperature", "dist_beta", "dist_gamma", "dist_weight")),
    LossKind("ttm", _ttm_kind, "Zheng and Yang ICLR 2024 (arXiv 2402.11148), zkxufo/TTM",
             options=("ttm_gamma", "ttm_weight")),
    LossKind("wttm", _wttm_kind, "Zheng and Yang ICLR 2024 (arXiv 2402.11148), zkxufo/TTM",
             options=("wttm_gamma", "wttm_weight")),
    LossKind("attention_transfer", _attention_transfer_kind,
             "Zagoruyko and Komodakis ICLR 2017 (arXiv 1612.03928), "
             "szagoruyko/attention-transfer", options=("at_features", "at_weight"),
             features=lambda o: tuple(o.at_features), feature_match="spatial"),
    LossKind("mutual", _mutual_kind, "Zhang et al. CVPR 2018 (arXiv 1706.00384), "
             "YingZhangDUT/Deep-Mutual-Learning", options=("mutual_cohort", "mutual_temperature")),
    LossKind("known_kd", _known_kd_kind, "partial distillation on the teacher's classes "
             "(kdjax.teacher_signals.known_class_kd)", options=("known_classes",),
             needs=frozenset({"known_classes"}), grid=frozenset({"alpha", "temperature"})),
    LossKind("ctkd", _ctkd_kind, "Li et al. AAAI 2023 (arXiv 2211.16231), zhengli97/CTKD",
             options=("ctkd_t_start", "ctkd_t_range", "ctkd_init", "ctkd_max_lambda",
                      "ctkd_ramp_epochs", "ctkd_steps_per_epoch"),
             needs=frozenset({"learned_temperature"}), grid=frozenset({"alpha"})),
    LossKind("kd_correct_only", _kd_correct_only_kind,
             "kdjax's control for the transfer of the teacher's errors (issue 16)",
             grid=frozenset({"alpha", "temperature"})),
    LossKind("fgcr", _fgcr_kind, "arXiv 2405.13078 (global class relations)",
             options=("fgcr_fusion",), needs=frozenset({"class_relations"}),
             grid=frozenset({"alpha", "temperature"})),
    # The teachers' loss when arm_options.teacher_loss = 'regt' (not an arm: module docstring).
    LossKind("regt", _regt_kind, "arXiv 2405.13078", options=("regt_weight",)),
]}


def needs(kinds: Sequence[str]) -> frozenset[str]:
  """What the loss kinds `kinds` need beyond logits and labels (`LossKind.needs`)."""
  return frozenset().union(*(LOSS_KINDS[k].needs for k in kinds))


def feature_names(kinds: Sequence[str], options: LossOptions) -> tuple[str, ...]:
  """The feature maps the loss kinds `kinds` match (`LossKind.features`), each once."""
  names = [n for k in kinds if LOSS_KINDS[k].features is not None
           for n in LOSS_KINDS[k].features(options)]
  return tuple(dict.fromkeys(names))


def kind_loss(kind: str, student_logits, teacher_logits, labels, hp: ReplicaHParams, step,
              options: LossOptions, *, student_features=None, teacher_features=None,
              class_relations=None, mask=None) -> jax.Array:
  """Per-example loss of one loss kind for one replica (`LOSS_KINDS[kind].loss`);
  teacher_logits may be None for 'ce' and 'regt'."""
  if kind not in LOSS_KINDS:
    raise ValueError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
  inputs = LossInputs(student_logits=student_logits, labels=labels,
                      teacher_logits=teacher_logits, student_features=student_features,
                      teacher_features=teacher_features, class_relations=class_relations,
                      mask=mask)
  return LOSS_KINDS[kind].loss(inputs, hp, step, options)
