"""The linear-model theory of Nagarajan et al. (arXiv 2301.12923, Sec. 4) as a study.

A bias-free linear model (kdjax's `linear`) on kdjax's synthetic Gaussian data with a known
covariance spectrum (within-class eigenvalues lambda_i = i^-decay along the coordinate axes,
kdjax/data/synthetic.py), trained by full-batch gradient descent (batch = the whole train split,
no momentum, no weight decay, constant learning rate), so every saved step is a GD iterate:

  teacher  one-hot labels, stopped early (teacher_num_epochs steps; one step per epoch)
  kd       distilled from that teacher (alpha = 1, T = 1), from the teacher's initial weights
  siddo    one-hot labels from the same initial weights for as long as the student: the teacher
           had it not been stopped

Weights are checkpointed every step (every 2 at full size) and kept, and the analysis reads them
all (kdjax/analysis/eigen.py): `eigen_trajectory` projects the weights on every eigendirection of
the train inputs' second-moment matrix over time (Theorem 4.1: the student keeps up with the
teacher along the top eigendirections and lags along the bottom ones), `gradient_denoising`
measures how well each model's updates align with the Bayes-optimal weights of the generating
Gaussians (Theorem 4.3: with similar classes, distillation denoises the one-hot gradient).

The argument is a comma-separated list of flags:
  smoke       small (dim 32, 2000 train points, 30 teacher / 120 student steps): 2 minutes
              on 2 CPU cores
  superclass  the class-similarity variant: 10 classes in 2 superclasses whose classes lie close
              together (separation 4 between superclass centres, 1 within), for Theorem 4.3;
              without it the 10 class means are independent directions (no class similarity)

  ./kd run --config=configs/linear_eigen.py:smoke --workdir=runs/linear_eigen_smoke
  ./kd run --config=configs/linear_eigen.py:smoke,superclass --workdir=runs/linear_eigen_sc_smoke

Full size (dim 64, 8000 train points, 100 teacher / 400 student steps; the paper's theory is for
exactly this kind of data, so the synthetic data are the full-size data too):

  ./kd run --config=configs/linear_eigen.py --workdir=runs/linear_eigen
  ./kd run --config=configs/linear_eigen.py:superclass --workdir=runs/linear_eigen_sc
"""

from __future__ import annotations

import ml_collections

from kdjax import configfile

FLAGS = ("smoke", "superclass")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  flags = [f.strip() for f in (arg or "").split(",") if f.strip()]
  bad = [f for f in flags if f not in FLAGS]
  if bad:
    raise ValueError(f"configs/linear_eigen.py takes a comma-separated list of {', '.join(FLAGS)}"
                     f"; got {arg!r}")
  smoke, superclass = "smoke" in flags, "superclass" in flags
  dim, n_train = (32, 2000) if smoke else (64, 8000)
  teacher_steps, student_steps = (30, 120) if smoke else (100, 400)
  if superclass:
    classes = "classes=10,superclasses=2,separation=4,class_separation=1"
  else:
    classes = "classes=10,superclasses=1,separation=0,class_separation=2"

  config = configfile.base_config(__file__)
  config.dataset = (f"synthetic:{classes},dim={dim},n_train={n_train},n_test=2000,decay=1,"
                    "label_noise=0,seed=0")
  config.model = "linear"
  config.model_kwargs = ml_collections.ConfigDict({"use_bias": False})
  config.arms = "siddo,kd"
  config.student_init = "teacher"  # kd starts from the teacher's initial weights, as siddo does
  config.alpha = "1.0"
  config.temperature = "1.0"
  config.kd_windows = "0-1"
  config.num_seeds = 1
  config.num_teachers = 1
  config.analyses = "eigen_trajectory,gradient_denoising"

  # Full-batch gradient descent: one step per epoch, so epochs count steps.
  config.batch_size = n_train
  config.teacher_num_epochs = teacher_steps
  config.num_epochs = student_steps
  config.optimizer.name = "sgd"
  # Stable for the largest curvature of each data set (the superclass centres add a large
  # eigenvalue), small enough that the bottom eigendirections move slowly.
  config.optimizer.learning_rate = "0.3" if superclass else "1.0"
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule = "constant"

  config.eval_batch_size = 2000
  config.eval_every_steps = 10
  config.log_every_steps = 10
  config.checkpoint_every_steps = 1 if smoke else 2
  config.keep_checkpoints = student_steps + 1  # every saved step stays for the analysis
  return config
