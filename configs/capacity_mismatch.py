"""Teacher capacity and dark knowledge (Fan, Li and Zhan, arXiv 2405.13078).

Teachers of several capacities are trained on labels; one student architecture (fresh
initialisation) is distilled from EVERY teacher model under
  kd     Hinton et al. 2015, (1 - alpha) CE + alpha T^2 KL with the study's alpha and T,
  ats    asymmetric temperature scaling (Li et al., arXiv 2210.04427) as the ATS authors' code
         trains it: teacher target / non-target temperatures tau_1 = 4, tau_2 = 2
         (`arm_options.ats_*_temperature`), student at T = 1, 0.5 CE + 0.5 KD; the study's
         alpha and temperature are not used (arm_options ce_weight / kd_weight,
         ats_student_temperature),
  isats  instance-specific ATS (the paper's method, kdjax's reading): tau_1 = 4
         (`isats_target_temperature`), tau_2 chosen per example from 1.0, 1.1, ..., 5.0 to
         maximise the variance of the non-target probabilities; student and weights as ats,
  fgcr   the teacher's distribution fused with its global class relations on the train split,
         both at T = 1, then softened at the study temperature,
plus `onehot` (labels only) as the no-teacher reference. The `capacity` analysis section
(kdjax/analysis/capacity.py) reports per teacher model its parameter count, accuracy and mean
non-target variance (the paper's first observation: larger teachers have less distinct
non-target probabilities), the class-rank consistency between every pair of teacher models
(top-k rank-set overlap, Spearman, Kendall: the second observation), and the students' accuracy
per arm x teacher model (mean ± std over seeds: capacity mismatch).

RegT (teachers trained with a reward for distinct non-target probabilities) changes the TEACHERS,
so it is its own study: the variant `regt` trains every teacher with `kdjax.losses.regt_loss`
(arm_options.teacher_loss='regt') and distils the students under kd; its kd row is the paper's
"RegT" row, to be read against the kd row of the main study (same seeds, same students).

The argument is `SIZE[,regt]`:

  smoke  digits (offline, ships with scikit-learn); cnn teachers of widths 0.25, 0.5, 1, 2;
         cnn(width=0.25) students; 2 seeds; a few minutes on 2 CPU cores:

           ./kd run --config=configs/capacity_mismatch.py:smoke --workdir=runs/cap_smoke
           ./kd run --config=configs/capacity_mismatch.py:smoke,regt --workdir=runs/cap_smoke_regt

  paper  CIFAR-100; ResNet-20/32/56/110 teachers, ResNet-8 students, 240 epochs, SGD 0.05 with
         step decay at epochs 150/180/210 (the usual CIFAR-100 KD recipe), T = 4, 3 seeds.
         With 3 seeds a two-sided Mann-Whitney test cannot give p < 0.1 (2 / C(6, 3)); the
         report's p-values are exact or permutation p-values (kdjax.stats.mann_whitney_u).
         Prepare the data where there is network (`tfds build cifar100 --data_dir=DIR`), then on
         a GPU or TPU:

           ./kd run --config=configs/capacity_mismatch.py:paper --workdir=runs/cap_cifar100 \\
               --config.data_dir=DIR
           ./kd run --config=configs/capacity_mismatch.py:paper,regt \\
               --workdir=runs/cap_cifar100_regt --config.data_dir=DIR

Any key can be overridden on the command line, e.g. `--config.num_seeds=5`.
"""

from __future__ import annotations

import ml_collections

from kdjax import configfile

SIZES = ("smoke", "paper")
VARIANTS = ("", "regt")
ARMS = "kd,ats,isats,fgcr,onehot"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, variant = configfile.parse_arg(arg, "configs/capacity_mismatch.py", "smoke", size=SIZES,
                                       variant=VARIANTS)
  config = configfile.base_config(__file__)
  config.student_init = "fresh"  # one student architecture learns from every teacher model
  config.analyses = "capacity"
  config.arms = ARMS
  config.num_teachers = 1
  if size == "smoke":
    config.dataset = "digits"
    config.teacher_model, config.teacher_model_kwargs = "cnn", {}
    config.teacher_model_grid = {"width": "0.25,0.5,1,2"}
    config.model, config.model_kwargs = "cnn", {"width": 0.25}
    config.num_seeds = 2
    config.num_epochs = 12
    # alpha T^2 = 14.4 scales the kd / fgcr gradient: 0.1 (the default study's rate) made the
    # kd students of an 8-epoch trial swing by up to 0.4 in accuracy between seeds. (ats and
    # isats use the ATS authors' T = 1 and weights 0.5 / 0.5, not alpha and T.)
    config.optimizer.learning_rate = "0.05"
    config.temperature = "4.0"
    config.alpha = "0.9"
  else:
    config.dataset = "cifar100"
    config.teacher_model, config.teacher_model_kwargs = "resnet20,resnet32,resnet56,resnet110", {}
    config.model, config.model_kwargs = "resnet8", {}
    config.num_seeds = 3
    config.num_epochs = 240
    config.batch_size = 64
    config.augment = "weak"
    config.temperature = "4.0"
    config.alpha = "0.9"
    config.optimizer.learning_rate = "0.05"
    config.optimizer.schedule = "step"
    config.optimizer.decay_boundaries = (0.625, 0.75, 0.875)  # epochs 150, 180, 210 of 240
    config.optimizer.decay_factor = 0.1
    config.optimizer.weight_decay = 5e-4
    config.eval_batch_size = 500
    config.eval_every_steps = 2000
    config.log_every_steps = 500
    config.checkpoint_every_steps = 5000
  if variant == "regt":
    config.arm_options.teacher_loss = "regt"
    config.arms = "kd"
  return config
