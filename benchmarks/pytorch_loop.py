"""Baseline: kdjax's default study trained as a plain PyTorch loop, for a wall-time comparison.

What it does. The training of configs/default.py, written the way a torchdistill/mdistiller user
would write it: one model after another in a Python loop, torch.nn modules, torch.optim.SGD with a
LambdaLR cosine schedule, the data preloaded as tensors in memory, torch's default thread count.

  1 teacher   cnn(width=0.25) trained with cross-entropy on the digits train split;
  24 students of the same architecture, each initialised from the teacher's INITIAL parameters:
    8 x kd     (1 - alpha) CE + alpha T^2 KL(softmax(t / T) || softmax(s / T)), alpha 0.5, T 1,
               t = the trained teacher's logits on the same batch (teacher forward, no grad);
    8 x rcd    the same loss with t replaced by fresh U[0, 1) noise every step;
    8 x siddo  cross-entropy only;
  then every student (and the teacher) is evaluated once on the test split (accuracy).

How it matches kdjax's default study (configs/default.py and the modules named):
  * data: scikit-learn's bundled digits, kdjax's fixed stratified split (kdjax/data/digits.py,
    re-implemented in `split_indices` below; 1198 train, 599 test), pixels round(v * 255 / 16) as
    uint8, then / 255 and (x - mean) / std with kdjax's digits DatasetSpec constants
    (kdjax/data/digits.py MEAN/STD, used by kdjax/data/sources.py); no augmentation.
  * model (kdjax/models/simple.py `CNN`, width 0.25): three 3x3 convs with bias, padding 1,
    channels floor((32, 64, 64) * 0.25) = (8, 16, 16), strides (1, 2, 1), ReLU after each, no
    BatchNorm, global average pooling, a Linear head 16 -> 10. Conv weights He-normal with fan-out
    and zero bias (kdjax/models/_common.py `conv_init`, flax's zero bias); the head keeps
    PyTorch's default init.
  * optimiser (kdjax/optim.py): SGD, momentum 0.9 (no dampening, no Nesterov), weight decay 5e-4
    added to the gradient (optax.add_decayed_weights before optax.sgd = PyTorch SGD's coupled
    weight_decay, on every parameter), learning rate 0.1 * cosine decay to 0 over all
    12 * ceil(1198 / 64) = 228 steps (optax.cosine_decay_schedule: step k trains with
    0.1 * (1 + cos(pi * k / 228)) / 2, so LambdaLR stepped after every optimiser step).
  * batches: 64, a fresh shuffle per model per epoch (each student its own order), the last batch
    of an epoch the 46 remaining examples (kdjax pads it to 64 and masks the padding; the loss is
    the mean over real examples in both).
  * losses (kdjax/losses.py `kd_loss`, `random_control_logits`; kdjax/arms.py): as above, per-batch
    mean; the rcd range [rcd_minval, rcd_maxval) = [0, 1) from configs/default.py arm_options.

What it does not do (kdjax's study does all of these): no checkpoints (configs/default.py:
checkpoint_every_steps 200), no evaluation during training (eval_every_steps 100), no
TensorBoard events or metrics.json, no analysis stage (functional similarity of each student to
its teacher, Mann-Whitney tests across arms, the report and plots), no resumption, no bitwise
reproducibility (PyTorch's own init and RNG: the numbers are not kdjax's, only the work is).
It does not import kdjax, so it runs in an environment with only torch, numpy and scikit-learn.

How to run it (a separate venv: PyTorch must not go into kdjax's .venv, whose versions are pinned
by constraints.txt):

  python3.11 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy scikit-learn
  /tmp/torchvenv/bin/python benchmarks/pytorch_loop.py --json /tmp/torch_loop.json

It prints the wall time of each phase (import of torch/numpy/sklearn, data, teacher training,
students training, eval) and the total, the process's CPU time, the 1-minute load average at start
and end (on a shared machine the wall times vary several-fold: torch's default intra-op threads
slow down badly when the cores are busy), and the test accuracy per arm; --json FILE writes the
same figures. Compare with kdjax's `./kd bench end_to_end --part study` (benchmarks/end_to_end.py),
which times `./kd run --config=configs/default.py` (all three stages) the same way.

--device cuda trains on a GPU (data, models and noise there; the data order from the same CPU
generators), --num-seeds and --epochs shrink or grow the study; the students' examples/s
(students x epochs x train examples / their training time) is printed and written to the JSON:
benchmarks/accelerator_check.sh compares it with the engine's.
"""

from __future__ import annotations

import os
import time

_T0 = time.perf_counter()
_CPU0 = time.process_time()
_LOAD0 = os.getloadavg()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import argparse
import json
import math
import platform
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

_T_IMPORT = time.perf_counter() - _T0

# --- Constants copied from kdjax (this script must not import it). ---
# kdjax/data/digits.py: SPLIT_SEED, NUM_CLASSES, and the train split's pixel mean / population std
# after uint8 / 255 (MEAN, STD; the digits DatasetSpec in kdjax/data/sources.py uses them).
SPLIT_SEED = 0
NUM_CLASSES = 10
MEAN = 0.30583
STD = 0.37618
# configs/default.py: the study.
WIDTH = 0.25                 # model_kwargs.width
NUM_SEEDS = 8                # num_seeds (per arm)
ARMS = ("kd", "rcd", "siddo")
ALPHA = 0.5                  # alpha
TEMPERATURE = 1.0            # temperature
BATCH_SIZE = 64              # batch_size
NUM_EPOCHS = 12              # num_epochs (teacher_num_epochs = -1: the same)
LEARNING_RATE = 0.1          # optimizer.learning_rate
MOMENTUM = 0.9               # optimizer.momentum
WEIGHT_DECAY = 5e-4          # optimizer.weight_decay (coupled, kdjax/optim.py)
RCD_MINVAL = 0.0             # arm_options.rcd_minval
RCD_MAXVAL = 1.0             # arm_options.rcd_maxval


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """kdjax/data/digits.py's split: per class in turn, one RandomState(0) stream permutes the
  class's indices (file order) and the first round(n_c / 3) are test; both splits sorted."""
  rng = np.random.RandomState(SPLIT_SEED)
  is_test = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    is_test[idx[rng.permutation(len(idx))[:int(round(len(idx) / 3))]]] = True
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def load_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
  """{split: (images float32 [N, 1, 8, 8] normalised, labels int64 [N])}."""
  bunch = load_digits()
  raw, labels = np.asarray(bunch.images), np.asarray(bunch.target)
  out = {}
  for split, idx in split_indices(labels).items():
    uint8 = np.round(raw[idx] * (255.0 / 16.0)).astype(np.uint8)  # kdjax's stored form
    x = (uint8.astype(np.float32) / 255.0 - MEAN) / STD
    out[split] = (torch.from_numpy(x[:, None]).contiguous(),
                  torch.from_numpy(labels[idx].astype(np.int64)))
  return out


class CNN(nn.Module):
  """kdjax's `cnn`: 3x3 conv + ReLU x 3 (stride 1, 2, 1), global average pool, Linear head."""

  def __init__(self, width: float = WIDTH, num_classes: int = NUM_CLASSES):
    super().__init__()
    c1, c2, c3 = (max(1, int(math.floor(c * width + 1e-6))) for c in (32, 64, 64))
    self.stem = nn.Conv2d(1, c1, 3, stride=1, padding=1)
    self.block1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
    self.block2 = nn.Conv2d(c2, c3, 3, stride=1, padding=1)
    self.head = nn.Linear(c3, num_classes)
    for conv in (self.stem, self.block1, self.block2):
      nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
      nn.init.zeros_(conv.bias)

  def forward(self, x):
    x = F.relu(self.stem(x))
    x = F.relu(self.block1(x))
    x = F.relu(self.block2(x))
    return self.head(x.mean(dim=(2, 3)))


def kd_loss(student_logits, teacher_logits, labels, alpha=ALPHA, temperature=TEMPERATURE):
  """(1 - alpha) CE + alpha T^2 KL(softmax(t / T) || softmax(s / T)), mean over the batch."""
  ce = F.cross_entropy(student_logits, labels)
  kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                F.log_softmax(teacher_logits / temperature, dim=-1),
                reduction="batchmean", log_target=True)
  return (1.0 - alpha) * ce + alpha * temperature ** 2 * kl


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, arm: str, seed: int,
          teacher: nn.Module | None = None) -> nn.Module:
  """Trains `model` in place: NUM_EPOCHS epochs of shuffled batches, arm 'teacher' or 'siddo'
  (CE), 'kd' (from `teacher`) or 'rcd' (from uniform noise)."""
  n = x.shape[0]
  steps_per_epoch = math.ceil(n / BATCH_SIZE)
  total_steps = NUM_EPOCHS * steps_per_epoch
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) /
                                                    total_steps)))
  generator = torch.Generator().manual_seed(seed)
  device = x.device
  model.train()
  for _ in range(NUM_EPOCHS):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, BATCH_SIZE):
      idx = order[start:start + BATCH_SIZE].to(device)
      xb, yb = x[idx], y[idx]
      logits = model(xb)
      if arm == "kd":
        with torch.no_grad():
          teacher_logits = teacher(xb)
        loss = kd_loss(logits, teacher_logits, yb)
      elif arm == "rcd":
        noise = torch.rand(logits.shape, generator=generator).to(device) * \
            (RCD_MAXVAL - RCD_MINVAL) + RCD_MINVAL
        loss = kd_loss(logits, noise, yb)
      else:  # teacher, siddo
        loss = F.cross_entropy(logits, yb)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      scheduler.step()
  return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
  model.eval()
  return (model(x).argmax(-1) == y).float().mean().item()


def main(argv=None) -> dict:
  global NUM_EPOCHS, NUM_SEEDS  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--json", metavar="FILE", help="write the figures to FILE as JSON")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
  parser.add_argument("--num-seeds", type=int, default=NUM_SEEDS, help="students per arm")
  parser.add_argument("--epochs", type=int, default=NUM_EPOCHS)
  args = parser.parse_args(argv)
  NUM_EPOCHS, NUM_SEEDS = args.epochs, args.num_seeds
  device = torch.device(args.device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  times = {"import": _T_IMPORT}

  t = time.perf_counter()
  data = load_data()
  x_train, y_train = (t.to(device) for t in data["train"])
  x_test, y_test = (t.to(device) for t in data["test"])
  times["data"] = time.perf_counter() - t

  t = time.perf_counter()
  torch.manual_seed(args.seed)
  teacher = CNN().to(device)
  teacher_init = {k: v.clone() for k, v in teacher.state_dict().items()}
  train(teacher, x_train, y_train, "teacher", seed=args.seed)
  teacher.eval()
  sync()
  times["teacher_train"] = time.perf_counter() - t

  t = time.perf_counter()
  students = []
  for a, arm in enumerate(ARMS):
    for s in range(NUM_SEEDS):
      student = CNN().to(device)
      student.load_state_dict(teacher_init)  # identical initialisation (student_init='teacher')
      seed = args.seed + 1 + a * NUM_SEEDS + s   # each student its own data order / noise
      train(student, x_train, y_train, arm, seed=seed, teacher=teacher if arm == "kd" else None)
      students.append((arm, student))
  sync()
  times["students_train"] = time.perf_counter() - t
  students_examples_per_sec = len(students) * NUM_EPOCHS * x_train.shape[0] / \
      times["students_train"]

  t = time.perf_counter()
  teacher_accuracy = accuracy(teacher, x_test, y_test)
  per_arm = {arm: [] for arm in ARMS}
  for arm, student in students:
    per_arm[arm].append(accuracy(student, x_test, y_test))
  times["eval"] = time.perf_counter() - t
  times["total"] = time.perf_counter() - _T0
  cpu_s = time.process_time() - _CPU0

  result = {
      "times_s": times,
      "teacher_test_accuracy": teacher_accuracy,
      "student_test_accuracy": per_arm,
      "student_mean_test_accuracy": {a: statistics.fmean(v) for a, v in per_arm.items()},
      "steps_per_model": NUM_EPOCHS * math.ceil(x_train.shape[0] / BATCH_SIZE),
      "num_train": int(x_train.shape[0]),
      "num_test": int(x_test.shape[0]),
      "torch": torch.__version__,
      "torch_num_threads": torch.get_num_threads(),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "seed": args.seed,
      "device": str(device),
      "num_students": len(students),
      "students_examples_per_sec": students_examples_per_sec,
      # The process's CPU time (all threads) and the 1-minute load average at start and end: a
      # wall time far above cpu_s / threads, or a load above the core count, means the machine
      # was shared.
      "cpu_s": cpu_s,
      "cpu_count": os.cpu_count(),
      "loadavg_1min_start": _LOAD0[0],
      "loadavg_1min_end": os.getloadavg()[0],
  }
  for name in ("import", "data", "teacher_train", "students_train", "eval", "total"):
    print(f"{name:>15s} {times[name]:8.2f} s")
  print(f"{'cpu':>15s} {cpu_s:8.2f} s (process CPU time, {torch.get_num_threads()} threads); "
        f"1-min load average {_LOAD0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"{os.cpu_count()} CPUs")
  print(f"students: {len(students)} on {device}, {students_examples_per_sec:.0f} examples/s")
  print(f"teacher test accuracy {teacher_accuracy:.4f}")
  for arm, values in per_arm.items():
    print(f"{arm:>6s} students: mean test accuracy {statistics.fmean(values):.4f} "
          f"(min {min(values):.4f}, max {max(values):.4f}, n={len(values)})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
