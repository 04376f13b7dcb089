"""Ensemble distillation with weakly and strongly augmented teachers (Guo et al., "Why does
Knowledge Distillation Work? Rethink its Attention and Fidelity Mechanism", arXiv 2405.00739).

Two teachers T1, T2 are each trained twice, with weak and with strong augmentation (teacher
seeds 0 and 1 x teacher_augment weak,strong: a teacher's two versions share initialisation and
data order). Their ensembles in every combination (T1w+T2w, T1w+T2s, T1s+T2w, T1s+T2s; the
`ensembles` key) are distilled into a smaller student by ensemble KD (the mean of the KD loss
against each member, as in the authors' code) with and without logit standardisation
(ensemble_standardized_kd); kd students of each single teacher are the paper's one-teacher rows.
The `ensemble_attention` section reports, per arm and ensemble, student accuracy, fidelity to the
ensemble (top-1 agreement, KL), mutual information, and the teachers' attention-map (CAM) IoU,
as the paper's tables (kdjax/analysis/ensemble.py has the exact definitions).

The argument is `DATASET[,strong_student]`:
  DATASET         smoke      digits (offline, ships with scikit-learn): cnn teachers of width 0.5,
                             cnn students of width 0.25, 3 seeds, three ensembles
                  cifar100   ResNet-50 teachers, ResNet-18 students (the paper's pair), 200
                             epochs, T = 3, KD weight 0.4 (the authors' --alpha 0.6 weighs the
                             cross-entropy), learning-rate steps at epochs 190 and 195, 5 seeds
                  cifar10    the same on CIFAR-10
  strong_student  the students train on strongly augmented batches (the paper's "Ss" rows; the
                  teachers then see the same strongly augmented batch); default weak ("Sw").
Differences from the paper: its teachers are ImageNet-pretrained ResNet-50s fine-tuned on the
task; kdjax trains them from scratch (no weights can be downloaded for the offline default, and
the comparison between augmentations does not need them). The smoke study uses 8x8 digits, where
a crop with padding and colour jitter are strong relative to the image: expect the direction of
the findings, not their size.

Smoke size (2 CPU cores, a few minutes, nothing to download):

  ./kd run --config=configs/ensemble_attention.py:smoke --workdir=runs/ensemble_smoke

Paper size (prepare the data where there is network with `tfds build cifar100 --data_dir=DIR`,
then on a GPU or TPU):

  ./kd run --config=configs/ensemble_attention.py:cifar100 --workdir=runs/ensemble_cifar100 \\
      --config.data_dir=DIR
  ./kd run --config=configs/ensemble_attention.py:cifar100,strong_student \\
      --workdir=runs/ensemble_cifar100_ss --config.data_dir=DIR

Any key can be overridden on the command line, e.g. `--config.num_seeds=10`.
"""

from __future__ import annotations

import ml_collections

from kdjax import configfile

DATASETS = ("smoke", "cifar100", "cifar10")
VARIANTS = ("", "strong_student")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  dataset, variant = configfile.parse_arg(arg, "configs/ensemble_attention.py", "smoke",
                                          dataset=DATASETS, variant=VARIANTS)
  config = configfile.base_config(__file__)
  config.arms = "ensemble_kd,ensemble_standardized_kd,kd"
  config.num_teachers = 2                   # T1 and T2
  config.teacher_augment = "weak,strong"    # each trained both ways
  config.student_init = "fresh"             # a smaller student: nothing to share with a teacher
  config.temperature = "3"
  config.alpha = "0.4"
  config.analyses = "ensemble_attention"
  config.augment = "strong" if variant == "strong_student" else "weak"

  if dataset == "smoke":
    config.model = "cnn"
    config.model_kwargs = ml_collections.ConfigDict({"width": 0.25})
    config.teacher_model = "cnn"
    config.teacher_model_kwargs = ml_collections.ConfigDict({"width": 0.5})
    config.ensembles = "weak+weak,strong+weak,strong+strong"
    config.num_seeds = 3
    config.num_epochs = 12
  else:
    config.dataset = dataset
    config.model = "resnet18"
    config.model_kwargs = ml_collections.ConfigDict()
    config.teacher_model = "resnet50"
    config.teacher_model_kwargs = ml_collections.ConfigDict()
    config.ensembles = "weak+weak,weak+strong,strong+weak,strong+strong"
    config.num_seeds = 5
    config.num_epochs = 200
    config.batch_size = 128
    config.optimizer.learning_rate = "0.1"
    config.optimizer.schedule = "step"
    config.optimizer.decay_boundaries = (0.95, 0.975)  # epochs 190 and 195 of 200
    config.optimizer.decay_factor = 0.1
    config.eval_batch_size = 1000
    config.eval_every_steps = 2000
    config.log_every_steps = 200
    config.checkpoint_every_steps = 2000
  return config
