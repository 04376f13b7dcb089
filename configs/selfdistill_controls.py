"""Self-distillation against its controls (Mason-Williams et al., arXiv 2510.12615).

A teacher is trained on labels; students with the teacher's architecture and initial parameters
are trained under kd (alpha in {0.1, 0.5, 0.9}, T = 1), rcd (the teacher's logits replaced by
uniform noise) and siddo (labels only, same initialisation, different data order), and every
student's functional similarity to its teacher is compared across arms (two-sided Mann-Whitney U
at 0.05, Holm across metrics). The argument is `DATASET[,VARIANT]`:

  DATASET  smoke            digits (offline, ships with scikit-learn), small CNN, 4 seeds
           cifar10          ResNet-20            (images)
           svhn_cropped     ResNet-20            (images)
           speech_commands  M5 1-D CNN           (audio)
           tiny_shakespeare char transformer     (language, next-character prediction)
  VARIANT  (none)           the main study: arms kd, rcd, siddo, the alpha grid
           width            student width scaling: one teacher, students of several widths (fresh
                            initialisation, arms kd, rcd, onehot); the `width_scaling` section plots
                            agree_when_teacher_correct / _incorrect against width, the paper's
                            "errors transfer faster" curve
           heavy_aug        a teacher trained with heavy augmentation (higher train loss) against
                            a standard one: teacher_augment none,strong; kd students of each
                            (images only)
           temperature      a temperature sweep of kd, T in {1, 2, 4, 8}
           features         feature-map matching at a chosen block (the `feature_hint` arm)

Smoke size, on 2 CPU cores in a few minutes, nothing to download:

  ./kd run --config=configs/selfdistill_controls.py:smoke --workdir=runs/sd_smoke
  ./kd run --config=configs/selfdistill_controls.py:smoke,width --workdir=runs/sd_width_smoke

Paper size (10 seeds per arm and alpha; prepare the data where there is network with
`tfds build cifar10 --data_dir=DIR`, then on a GPU or TPU):

  ./kd run --config=configs/selfdistill_controls.py:cifar10 --workdir=runs/sd_cifar10 \\
      --config.data_dir=DIR
  ./kd run --config=configs/selfdistill_controls.py:cifar10,width --workdir=runs/sd_cifar10_width \\
      --config.data_dir=DIR

Any key can be overridden on the command line, e.g. `--config.num_seeds=20`.
"""

from __future__ import annotations

import os

import ml_collections

from kdjax import study as study_lib

# dataset -> (kdjax.models name, epochs, batch size, learning rate, augment preset, hint block)
DATASETS = {
    "smoke": ("cnn", 12, 64, 0.1, "none", "block1"),
    "cifar10": ("resnet20", 160, 128, 0.1, "weak", "block2"),
    "svhn_cropped": ("resnet20", 40, 128, 0.05, "none", "block2"),
    "speech_commands": ("audio_m5", 30, 128, 0.05, "none", "block2"),
    "tiny_shakespeare": ("char_transformer", 20, 64, 3e-4, "none", "block1"),
}
VARIANTS = ("", "width", "heavy_aug", "temperature", "features")
# Student `width` values (the models' channel multiplier); the teacher keeps the dataset's model
# (width 1 at paper size, the default study's 0.25 at smoke size).
WIDTHS = "0.25,0.5,1,2"
SMOKE_WIDTHS = "0.125,0.25,0.5"


def _parse(arg: str | None) -> tuple[str, str]:
  dataset, _, variant = (arg or "smoke").partition(",")
  if dataset not in DATASETS or variant not in VARIANTS:
    raise ValueError(f"configs/selfdistill_controls.py takes DATASET[,VARIANT] with DATASET one "
                     f"of {', '.join(DATASETS)} and VARIANT one of "
                     f"{', '.join(v for v in VARIANTS if v)}; got {arg!r}")
  if variant == "heavy_aug" and dataset in ("speech_commands", "tiny_shakespeare"):
    raise ValueError(f"the heavy_aug variant needs image data; {dataset} has none")
  return dataset, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  dataset, variant = _parse(arg)
  model, epochs, batch_size, learning_rate, augment, hint_block = DATASETS[dataset]
  smoke = dataset == "smoke"
  config = study_lib.load_config(os.path.join(os.path.dirname(__file__), "default.py"))
  config.arms = "kd,rcd,siddo"
  config.alpha = "0.1,0.5,0.9"
  config.temperature = "1"
  config.student_init = "teacher"

  if smoke:
    config.num_seeds = 4
    config.alpha = "0.5,0.9"  # two points keep the smoke study at 4 x (2 + 2 + 1) students
  else:
    config.dataset = dataset
    config.model = model
    config.model_kwargs = ml_collections.ConfigDict()
    config.num_seeds = 10
    config.num_epochs = epochs
    config.batch_size = batch_size
    config.augment = augment
    config.optimizer.learning_rate = str(learning_rate)
    if model == "char_transformer":
      config.optimizer.name = "adamw"
      config.optimizer.weight_decay = 0.01
      config.optimizer.warmup_steps = 200
    config.eval_batch_size = 1000
    config.eval_every_steps = 1000
    config.log_every_steps = 200
    config.checkpoint_every_steps = 1000

  if variant == "width":
    base = dict(config.model_kwargs)
    config.teacher_model = config.model
    config.teacher_model_kwargs = ml_collections.ConfigDict(base)
    widths = SMOKE_WIDTHS if smoke else WIDTHS
    config.model_grid = ml_collections.ConfigDict({"width": widths})
    config.student_init = "fresh"  # other widths cannot share the teacher's parameters
    config.arms = "kd,rcd,onehot"
    config.alpha = "0.9" if smoke else "0.5,0.9"
    config.analyses = "width_scaling"
  elif variant == "heavy_aug":
    config.teacher_augment = "none,strong"
    config.alpha = "0.5" if smoke else "0.1,0.5,0.9"
  elif variant == "temperature":
    config.arms = "kd,rcd,siddo"
    config.alpha = "0.5"
    config.temperature = "1,2,4" if smoke else "1,2,4,8"
  elif variant == "features":
    config.arms = "kd,feature_hint,rcd,siddo"
    config.alpha = "0.5"
    config.arm_options.hint_feature = hint_block
  return config
