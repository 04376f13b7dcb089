"""Student-teacher deviations and loss switching (Nagarajan et al., arXiv 2301.12923, Sec. 3).

One teacher is trained on labels; students of the same architecture are distilled from it with
the distillation loss on during one window of training and the one-hot loss outside it
(`kd_windows`, alpha = 1 inside the window, so the two losses are switched, not mixed):

  0-1                           KD throughout
  0.25-1, 0.5-1, 0.75-1         one-hot -> KD at 25, 50, 75% of training
  0-0.25, 0-0.5, 0-0.75         KD -> one-hot at 25, 50, 75%

plus `onehot` students trained on labels only (the baseline). All students start from a fresh
initialisation (`student_init = fresh`), as in the paper; a KD student and the one-hot student of
the same seed share their initial weights and data order, so they differ only in the loss. The
analysis adds two sections (kdjax/analysis/deviation.py): `deviation`, the fraction of points on
which a student is less confident than its teacher per bucket of teacher confidence (the paper
finds the student underfits the points the teacher finds hard; the scatter itself is
plots/confidence_scatter.png), and `kd_switch`, the final accuracy of every window (the paper
finds that switching to KD late recovers most of its gain).

Smoke size, offline digits, a small CNN, 3 seeds x 8 groups (24 students); 6 minutes measured on
2 CPU cores shared with other jobs, most of it compiling the 24 unrolled student steps:

  ./kd run --config=configs/deviation_switch.py:smoke --workdir=runs/deviation_switch_smoke

Paper size, CIFAR-100 and ResNet-56 self-distillation, 4 seeds x 8 groups (32 ResNet-56 students
as one program; prepare the data first where there is network:
`tfds build cifar100 --data_dir=DIR`), on a GPU or TPU:

  ./kd run --config=configs/deviation_switch.py --workdir=runs/deviation_switch \\
      --config.data_dir=DIR

The argument (`:smoke`, or none for paper size) picks the size; any key can be overridden.
"""

from __future__ import annotations

import ml_collections

from kdjax import configfile

SIZES = ("paper", "smoke")
WINDOWS = "0-1,0.25-1,0.5-1,0.75-1,0-0.25,0-0.5,0-0.75"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  (size,) = configfile.parse_arg(arg, "configs/deviation_switch.py", "paper", size=SIZES)
  config = configfile.base_config(__file__)
  config.arms = "onehot,kd"       # onehot first: the label-only baseline of kd_switch
  config.student_init = "fresh"   # kd students start from their own initialisation
  config.alpha = "1.0"            # inside a window the loss is the distillation loss alone
  config.temperature = "1.0"
  config.kd_windows = WINDOWS
  config.analyses = "deviation,kd_switch"

  if size == "smoke":
    # The default study's digits CNN and schedule: the teacher errs on ~30 of 360 test digits.
    config.num_seeds = 3
    return config

  config.dataset = "cifar100"
  config.model = "resnet56"
  config.model_kwargs = ml_collections.ConfigDict()
  config.num_seeds = 4
  config.batch_size = 128
  config.num_epochs = 200
  config.augment = "weak"         # random crop + horizontal flip, the CIFAR recipe
  config.optimizer.learning_rate = "0.1"
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4
  config.eval_batch_size = 1000
  config.eval_every_steps = 1955   # 5 epochs of 391 steps
  config.log_every_steps = 391
  config.checkpoint_every_steps = 1955
  return config
