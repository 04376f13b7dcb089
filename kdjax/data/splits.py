"""A validation split carved from the training split (`val_fraction`), for what must not see the
eval split: post-hoc temperature scaling of the teachers (kdjax.calibration).

The validation examples are round(fraction * N) of the N training examples, chosen by one fixed
permutation (`numpy.random.RandomState(VALIDATION_SEED).permutation(N)`, its first examples): the
same examples for every replica, seed and run of a study, whatever the config's `seed`. Both
parts keep the examples' original order. The eval split is never touched, and the training
stages train on the rest of the training split only (so `val_fraction` changes every stage's
data and steps per epoch).
"""

from __future__ import annotations

import numpy as np

VALIDATION_SEED = 0


def validation_size(num_train: int, fraction: float) -> int:
  """The number of validation examples carved from `num_train` at `fraction`."""
  return int(round(float(fraction) * int(num_train)))


def validation_indices(num_train: int, fraction: float) -> np.ndarray:
  """The sorted indices of the validation examples (module docstring)."""
  permutation = np.random.RandomState(VALIDATION_SEED).permutation(int(num_train))
  return np.sort(permutation[:validation_size(num_train, fraction)])


def carve_validation(train: dict, fraction: float) -> tuple[dict, dict]:
  """(the training split without its validation examples, the validation split): every array
  of `train` (leading axis N) split by `validation_indices`."""
  num = len(train["label"])
  val = validation_indices(num, fraction)
  keep = np.ones(num, bool)
  keep[val] = False
  return ({k: np.asarray(v)[keep] for k, v in train.items()},
          {k: np.asarray(v)[val] for k, v in train.items()})
