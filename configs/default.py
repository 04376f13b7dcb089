"""The default study: self-distillation with identical initialisation on the offline digits data.

Mason-Williams et al., "Rethinking Knowledge Distillation: A Data Dependent Regulariser With a
Negative Asymmetric Payoff" (arXiv 2510.12615): a teacher is trained on labels; students with the
teacher's architecture AND its initial parameters are trained under
  kd     distillation from the teacher (alpha, T = 1),
  rcd    the same loss with the teacher's logits replaced by uniform noise (random control),
  siddo  labels only: same initialisation, different data order,
for several seeds each, and each student's functional similarity to its teacher is compared
across arms (two-sided Mann-Whitney U at 0.05).

Runs on 2 CPU cores in a few minutes, with nothing to download:

  ./kd run --config=configs/default.py --workdir=runs/default

Override any key on the command line, e.g. `--config.num_seeds=16 --config.alpha=0.1,0.5,0.9`.
The argument after the file name is not used by this config (`configs/default.py:ARG`).
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()

  # What is studied.
  config.dataset = "digits"        # kdjax.data name; digits ships inside scikit-learn
  config.data_dir = ""             # default: $TFDS_DATA_DIR, else ~/tensorflow_datasets
  config.model = "cnn"             # the students' kdjax.models name
  config.model_kwargs = ml_collections.ConfigDict({"width": 0.25})
  config.teacher_model = ""        # "" = the students' model (self-distillation)
  config.teacher_model_kwargs = ml_collections.ConfigDict()  # used when teacher_model is set
  # Several capacities in one stage: keyword -> grid, e.g. {"width": "0.125,0.25,0.5"}; each
  # point is a model (its own engine); `model` and `teacher_model` may also list names.
  config.model_grid = ml_collections.ConfigDict()
  config.teacher_model_grid = ml_collections.ConfigDict()  # used when teacher_model is set
  config.arms = "kd,rcd,siddo"     # see kdjax/arms.py for all arms
  config.alpha = "0.5"             # one value or a grid, e.g. "0.1,0.5,0.9"
  config.temperature = "1.0"       # one value or a grid
  config.kd_windows = "0-1"        # START-STOP fractions of training with the teacher term on;
                                   # a list is a grid: "0-1,0.5-1,0-0.5" (one-hot <-> KD
                                   # switching, arXiv 2301.12923)
  config.num_seeds = 8             # per arm and grid point
  config.num_teachers = 1          # student seed s learns from teacher s mod num_teachers
  config.ensembles = ""            # ensemble arms: "" = every teacher; or compositions by the
                                   # members' teacher_augment presets, "weak+weak,strong+weak"
  config.student_init = "teacher"  # arms that follow the config: 'teacher' (identical) or 'fresh'
  config.stages = "teacher,students,analysis"
  config.analyses = ""             # study-specific report sections (kdjax/analysis/sections.py)
  config.seed = 0

  # Training (shared by teachers and students unless *_num_epochs differ).
  config.batch_size = 64
  config.num_epochs = 12
  config.teacher_num_epochs = -1   # -1: num_epochs. The small cnn errs on ~30 test digits
  config.augment = "none"          # 'none' | 'weak' | 'strong' (images only)
  config.teacher_augment = ""      # "" = augment; a list, e.g. "weak,strong", trains teachers
                                   # with each preset (num_teachers seeds each)
  config.shared_order = False      # True: every replica sees the same batches
  config.val_fraction = 0.0        # > 0: that fraction of train held out as a validation split
                                   # (teachers temperature-scaled on it: arm kd_calibrated)
  config.teacher_classes = ""      # "" = all; e.g. "0-4": teachers train on those classes only
                                   # (arm kd_known distils on them alone)
  config.optimizer = ml_collections.ConfigDict({
      "name": "sgd",
      "learning_rate": "0.1",      # one value or a grid (students); teachers use the first
      "momentum": 0.9,
      "nesterov": False,
      "weight_decay": 5e-4,
      "schedule": "cosine",
      "warmup_steps": 0,
      "decay_boundaries": (0.5, 0.75),
      "decay_factor": 0.1,
      "grad_clip_norm": 0.0,
  })

  # Settings of particular arms (see kdjax/arms.py).
  config.arm_options = ml_collections.ConfigDict({
      "label_smoothing": 0.1,
      # Loss weights per arm, "ARM=W,...": an arm in both lists is trained with
      # ce_weight * CE + kd_weight * (teacher term) instead of (1 - alpha) CE + alpha (...)
      # (mdistiller's convention; logit standardisation's authors: standardized_kd=0.1 / =9).
      # ats and isats: (1 - lamb, lamb) with lamb = 0.5, the ATS authors' code.
      "ce_weight": "ats=0.5,isats=0.5",
      "kd_weight": "ats=0.5,isats=0.5",
      # ATS (arXiv 2210.04427): teacher target / non-target temperatures tau_1 / tau_2 (the
      # authors search tau_1 in 1..6 x tau_2 in 1..5, any order) and the student's temperature
      # of the ats and isats arms (their s_tau = 1; these two arms ignore `temperature`).
      "ats_target_temperature": 4.0,
      "ats_nontarget_temperature": 2.0,
      "ats_student_temperature": 1.0,
      # ISATS (arXiv 2405.13078): tau_1, and the grid searched per example for the tau_2 that
      # maximises the non-target variance (1.0, 1.1, ..., 5.0: the ATS authors' tau_2 range).
      "isats_target_temperature": 4.0,
      "isats_temperatures": ",".join(f"{1 + 0.1 * i:.1f}" for i in range(41)),
      "dkd_alpha": 1.0,
      "dkd_beta": 8.0,
      "dkd_warmup_epochs": 20.0,   # DKD term ramps up linearly over 20 epochs (mdistiller)
      "hint_feature": "block1",
      "hint_weight": 1.0,
      "rcd_minval": 0.0,
      "rcd_maxval": 1.0,
      "fgcr_fusion": 0.5,          # fgcr: weight of the class relations R[y] in the teacher target
      "teacher_loss": "ce",        # 'ce' | 'regt': teachers trained with RegT (arXiv 2405.13078)
      "regt_weight": 0.05,         # regt: weight of the non-target variance reward (in [0, 1])
      # The logit baselines at their authors' defaults (kdjax/losses.py docstrings): NKD
      # (CE + NKD), DIST (CE + 2 DIST), TTM / WTTM (CE + weight x term; gamma = 1 / T on the
      # teacher only) and attention transfer (CE + 1e3 x the AT loss summed over at_features).
      "nkd_temperature": 1.0,
      "nkd_gamma": 1.5,
      "dist_temperature": 1.0,
      "dist_beta": 1.0,
      "dist_gamma": 1.0,
      "dist_weight": 2.0,
      "ttm_gamma": 0.1,
      "ttm_weight": 45.0,
      "wttm_gamma": 0.2,
      "wttm_weight": 4.0,
      "at_features": "block1,block2",
      "at_weight": 1000.0,
      # mutual (deep mutual learning): cohorts of this many consecutive seeds share batches and
      # learn CE + the mean KL to each peer at mutual_temperature (the authors: 2 and T = 1).
      "mutual_cohort": 2,
      "mutual_temperature": 1.0,
      # ensemble_kd_reliable: a member's weight, its validation "accuracy" or its mean
      # top probability there after temperature scaling ("confidence"); needs val_fraction.
      "ensemble_reliability": "accuracy",
      # ctkd: T = t_start + t_range sigmoid(theta), theta trained through gradient reversal of
      # strength rising (cosine) to max_lambda over ramp_epochs (the authors' CIFAR values).
      "ctkd_t_start": 1.0,
      "ctkd_t_range": 20.0,
      "ctkd_init": 1.0,
      "ctkd_max_lambda": 1.0,
      "ctkd_ramp_epochs": 10,
  })

  # How the analysis tests the arms (kdjax/analysis/statistics.py). equivalence_margins: the
  # +-margin of each metric's equivalence test (TOST), "METRIC=MARGIN,..." in the metric's units;
  # metrics not listed keep these defaults (1 point of accuracy, agreement and ECE; 5 points on
  # the teacher's errors, measured on few points; small fractions of the divergences' ranges).
  # Changing it changes only the analysis: rerun with --config.stages=analysis.
  config.analysis_options = ml_collections.ConfigDict({
      "equivalence_margins": "accuracy=0.01,agreement=0.01,agree_when_teacher_correct=0.01,"
                             "agree_when_teacher_incorrect=0.05,js_divergence=0.005,"
                             "activation_distance=0.02,kl_divergence=0.02,"
                             "rank_disagreement=0.02,mutual_information=0.05,ece=0.01",
  })

  # Execution, evaluation, checkpoints.
  # How each stage's replicas run (README, "What a study costs"): 'auto' = 'blocked' on CPU,
  # 'vmap' on GPU/TPU; 'blocked' compiles one program per block of replicas_per_block replicas
  # of one arm and runs it over the blocks, 'unrolled' compiles all replicas into one program.
  config.execution = "auto"        # 'auto' | 'blocked' | 'unrolled' | 'vmap'
  config.replicas_per_block = 0    # 'blocked': 0 = chosen by the stage's length, or 1, 2, ...
  # 'vmap': training steps per jitted call (a lax.scan over K steps; results equal K calls):
  # 0 = 1 on CPU, 8 on GPU/TPU. 'blocked' and 'unrolled' always take one step per call.
  config.steps_per_call = 0
  # The models' compute dtype: 'float32' or 'bfloat16' (parameters, BatchNorm statistics and
  # logits stay float32; the losses upcast). Part of the study: bf16 changes the results.
  config.compute_dtype = "float32"
  # The device mesh over all devices of all processes: replicas are sharded over 'replica'; each
  # replica's batch over 'data' (gradients summed, BatchNorm statistics synchronised over it).
  # Both 0 (default): each group of each stage gets the mesh that fits it, the largest replica
  # axis dividing its replica count and the devices, data taking the rest (README, "Running on
  # GPUs and TPUs"). Set either axis for one fixed mesh: -1 or 0 fills the devices the other
  # leaves; each group's replicas must then divide over replica, the batch sizes over data.
  config.mesh = ml_collections.ConfigDict({"replica": 0, "data": 0})
  config.eval_batch_size = 600
  config.eval_every_steps = 100
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.overwrite = False         # allow a workdir that holds a different study to be replaced
  return config
