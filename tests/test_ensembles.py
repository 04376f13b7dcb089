"""Teacher ensembles (arXiv 2405.00739): which teachers each student's ensemble holds, the loss
the engine trains on against them, and the `ensemble_attention` section's numbers, each checked
against an independent computation (enumeration by hand, kdjax.losses applied member by member,
numpy re-implementations of the attention map, IoU, fidelity and mutual information)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _cli

from kdjax import data
from kdjax import engine as engine_lib
from kdjax import losses
from kdjax import models
from kdjax import study as study_lib
from kdjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN = 1198  # digits' train split
CONFIG = ROOT / "configs" / "ensemble_attention.py"


def _config(**overrides):
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.update(dict(teacher_augment="weak,strong", num_teachers=2, student_init="fresh",
                     arms="ensemble_kd,ensemble_standardized_kd"))
  config.update(overrides)
  return config


# ---------------------------------------------------------------- 1. who is in each ensemble


def test_each_seed_gets_the_documented_members():
  """Member j of seed s's ensemble has the composition's j-th preset and teacher seed
  (s * M + j) mod num_teachers; compositions expand the ensemble arms; the replica carries its
  members and names the composition in teacher_augment."""
  study = study_lib.resolve(_config(ensembles="weak+weak,strong+weak,strong", num_teachers=4,
                                    num_seeds=3))
  teacher_of = {(t.augment, t.seed): t.index for t in study.teacher.replicas}
  assert len(teacher_of) == 8  # 4 seeds x 2 presets
  expected = []
  for arm in ("ensemble_kd", "ensemble_standardized_kd"):
    for composition in (("weak", "weak"), ("strong", "weak"), ("strong",)):
      for seed in range(3):
        m = len(composition)
        members = tuple(teacher_of[(p, (seed * m + j) % 4)] for j, p in enumerate(composition))
        expected.append((arm, seed, "+".join(composition), members))
  got = [(r.arm, r.seed, r.teacher_augment, r.ensemble) for r in study.students.replicas]
  assert got == expected
  # e.g. seed 1 of weak+weak: weak teachers of seeds 2 and 3 (indices 2, 3).
  assert got[1][3] == (2, 3)

  # Without `ensembles`: every teacher of the teacher model, for every seed.
  plain = study_lib.resolve(_config(arms="ensemble_kd", num_seeds=2))
  assert [r.ensemble for r in plain.students.replicas] == [(0, 1, 2, 3)] * 2


@pytest.mark.parametrize("overrides,key,fragment", [
    (dict(ensembles="weak+medium"), "ensembles", "'+'-joined augmentation presets"),
    (dict(ensembles="weak+weak,weak+weak"), "ensembles", "twice"),
    (dict(arms="kd", ensembles="weak+weak"), "ensembles", "no arm learns from an ensemble"),
    (dict(ensembles="weak+strong+weak"), "num_teachers", "at least 3"),
])
def test_bad_ensembles_name_the_key(overrides, key, fragment):
  with pytest.raises(study_lib.ConfigError) as error:
    study_lib.resolve(_config(**overrides))
  assert error.value.key == key and fragment in str(error.value)


# ---------------------------------------------------------------- 2. the loss trained on


def test_engine_loss_is_the_mean_of_the_member_losses():
  """One vmapped step over ensembles of different sizes (1 and 2 members: padded) on the whole
  train split as one batch (so the example order does not matter): each replica's logged loss
  equals the mean over its members of kdjax.losses' kd loss / standardised kd loss."""
  alpha, temperature = 0.5, 2.0
  study = study_lib.load_data(study_lib.resolve(_config(
      ensembles="strong,weak+strong,strong+strong", num_seeds=1, alpha=str(alpha),
      temperature=str(temperature), batch_size=NUM_TRAIN, num_epochs=1, execution="vmap")))
  (teacher_group,), (student_group,) = study.teacher.groups, study.students.groups
  teacher_engine = engine_lib.Engine(study, teacher_group)
  teacher_vars = teacher_engine.init_state().variables()  # untrained teachers do as well
  engine = engine_lib.Engine(study, student_group)
  state = engine.init_state()
  params0 = jax.device_get(state.params)
  arrays = data.to_device(study.data["train"], engine.replicated)
  teachers = jax.device_put(engine_lib.Teachers(variables=teacher_vars), engine.replicated)
  _, order = engine.order_for_step(state, study.num_train)
  _, metrics = engine.train_step(state, order, arrays, teachers)
  logged = np.asarray(metrics["loss"])

  spec = study.dataset
  x = (study.data["train"]["image"].astype(np.float32) / 255.0 - spec.mean[0]) / spec.std[0]
  y = study.data["train"]["label"]
  module = models.get("cnn", num_classes=10, width=0.25)
  teacher_logits = [module.apply(jax.tree.map(lambda a, j=j: a[j], teacher_vars), x, train=False)
                    for j in range(4)]
  assert len(study.students.replicas) == 6
  for r, replica in enumerate(study.students.replicas):
    s = module.apply({"params": jax.tree.map(lambda a: a[r], params0)}, x, train=True)
    if replica.arm == "ensemble_kd":
      per_member = [losses.kd_loss(s, teacher_logits[m], y, alpha=alpha, temperature=temperature)
                    for m in replica.ensemble]
    else:
      ce = losses.softmax_cross_entropy(s, y)
      per_member = [(1 - alpha) * ce + alpha * temperature**2 * losses.kl_divergence(
          losses.standardize_logits(teacher_logits[m]), losses.standardize_logits(s),
          temperature=temperature) for m in replica.ensemble]
    want = float(np.mean(np.mean(np.stack(per_member), axis=0)))
    np.testing.assert_allclose(logged[r], want, rtol=2e-5, err_msg=str(replica))


# ---------------------------------------------------------------- 3. the report section


def _bilinear_upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[N, h, w] -> [N, H, W], half-pixel centres with the source index clamped to the edge
  (PyTorch's F.interpolate(mode='bilinear', align_corners=False), the authors' resize)."""

  def weights(out_size, in_size):
    src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size))
    matrix[np.arange(out_size), lo] += 1 - frac
    matrix[np.arange(out_size), hi] += frac
    return matrix

  rows, cols = weights(size[0], maps.shape[1]), weights(size[1], maps.shape[2])
  return np.einsum("Hh,nhw,Ww->nHW", rows, maps, cols)


def _iou(map_a: np.ndarray, map_b: np.ndarray) -> float:
  """Mean per-example IoU of min-max normalised maps binarised at 0.5 (constant maps out)."""
  def binary(m):
    low, high = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
    return (m - low) / np.where(high > low, high - low, 1) > 0.5
  a, b = binary(map_a), binary(map_b)
  union = (a | b).sum((1, 2))
  keep = union > 0
  return float(np.mean((a & b).sum((1, 2))[keep] / union[keep]))


def _mutual_information(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
  joint = np.zeros((num_classes, num_classes))
  np.add.at(joint, (a, b), 1)
  joint /= joint.sum()
  outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
  nz = joint > 0
  return float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
  """configs/ensemble_attention.py:smoke cut to 1 seed, 2 ensembles, 2 epochs."""
  workdir = tmp_path_factory.mktemp("ensemble") / "run"
  proc = _cli.main(["--config.num_seeds=1", "--config.num_epochs=2",
                    "--config.ensembles=weak+weak,strong+strong", "--config.arms=ensemble_kd"],
                   workdir, _cli.env(), config=f"--config={CONFIG}:smoke")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_section_matches_numpy(ensemble_run):
  """Fidelity, MI and accuracy from predictions.npz, and the teachers' attention IoU from the
  final teacher checkpoints, recomputed in numpy, equal the section's numbers."""
  metrics = json.loads((ensemble_run / "analysis" / "metrics.json").read_text())
  section = metrics["analyses"]["ensemble_attention"]
  npz = np.load(ensemble_run / "analysis" / "predictions.npz")
  labels, t_logits, s_logits = npz["labels"], npz["teacher_logits"], npz["student_logits"]
  study = study_lib.load_data(study_lib.resolve(_smoke_study_config()))
  replicas = study.students.replicas
  assert [r.ensemble for r in replicas] == [(0, 1), (2, 3)]

  # Attention maps of every teacher: class-summed CAM, upsampled to 8x8, in numpy.
  _, states = train.load_final_state(study, str(ensemble_run), "teacher")
  (group,) = study.teacher.groups
  variables = jax.device_get(states[group.key].variables())
  spec = study.dataset
  x = (study.data["test"]["image"].astype(np.float32) / 255.0 - spec.mean[0]) / spec.std[0]
  module = models.get("cnn", num_classes=10, width=0.5)
  maps = []
  for j in range(4):
    v = jax.tree.map(lambda a, j=j: a[j], variables)
    _, features, _ = models.apply_with_features(module, v, jnp.asarray(x))
    kernel = np.asarray(v["params"]["head"]["kernel"], np.float64)
    cam = np.asarray(features["cam"], np.float64) @ kernel.sum(1)
    maps.append(_bilinear_upsample(cam, (8, 8)))
  pairs = {(p["a"], p["b"]): p for p in section["teacher_pairs"]}
  assert set(pairs) == {(0, 1), (2, 3)}
  for (a, b), p in pairs.items():
    np.testing.assert_allclose(p["iou"], _iou(maps[a], maps[b]), rtol=1e-5)
    np.testing.assert_allclose(p["agreement"], np.mean(
        t_logits[a].argmax(-1) == t_logits[b].argmax(-1)), rtol=1e-6)

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  for r, replica in enumerate(replicas):
    p_ens = np.mean([softmax(t_logits[m].astype(np.float64)) for m in replica.ensemble], 0)
    p_s = softmax(s_logits[r].astype(np.float64))
    s_pred, e_pred = p_s.argmax(-1), p_ens.argmax(-1)
    row = next(x for x in section["replicas"] if x["index"] == r)
    np.testing.assert_allclose(row["accuracy"], np.mean(s_pred == labels), rtol=1e-6)
    np.testing.assert_allclose(row["agreement"], np.mean(s_pred == e_pred), rtol=1e-6)
    np.testing.assert_allclose(row["kl_divergence"], np.mean(np.sum(
        p_ens * (np.log(p_ens) - np.log(p_s)), -1)), rtol=1e-4)
    np.testing.assert_allclose(row["mutual_information"],
                               _mutual_information(s_pred, e_pred, 10), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(row["teacher_iou"], pairs[tuple(replica.ensemble)]["iou"])
    group = section["groups"][row["group"]]
    assert group["composition"] == replica.teacher_augment and group["n"] == 1
  report = (ensemble_run / "analysis" / "report.md").read_text()
  assert "## Ensemble distillation: attention and fidelity" in report
  assert (ensemble_run / "analysis" / "plots" / "ensemble_attention.png").stat().st_size > 10_000


def _smoke_study_config():
  config = study_lib.load_config(str(CONFIG), "smoke")
  config.num_seeds, config.num_epochs = 1, 2
  config.ensembles, config.arms = "weak+weak,strong+strong", "ensemble_kd"
  return config
