"""Several models in one stage (kdjax.study.Group): teachers of two capacities and students
distilled from each, one compiled program per group, trained in one run. Each group must end
exactly where a study holding only that model ends, the students must pair with the right
teachers, and the analysis must keep the models apart.

The studies run in this process (`run_in_process`, which other test modules import for studies
that are not about the command line).
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest

import _cli
from kdjax import analysis
from kdjax import study as study_lib
from kdjax import train
# A persistent compilation cache for this module: the study of the wide model alone compiles
# the same programs as the wide group of the two-model study, so it is compiled once.
from test_engine import compilation_cache  # noqa: F401  (its module-scoped autouse fixture)
# Compiling is most of the training and analysis here: without LLVM's optimisation passes it
# takes half the time.
from test_engine_training import fast_compilation  # noqa: F401  (module-scoped autouse fixture)
from test_engine_training import optimizations_disabled

ROOT = pathlib.Path(__file__).resolve().parents[1]
NARROW, WIDE = "mlp(width=0.05)", "mlp(width=0.1)"


def _config(**overrides):
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.model, config.model_kwargs.width = "mlp", 0.05
  config.teacher_model = "mlp"
  config.teacher_model_kwargs.width = 0.05
  config.teacher_model_grid.width = "0.05,0.1"
  config.arms, config.student_init, config.num_seeds = "kd,onehot", "fresh", 2
  config.num_epochs, config.batch_size = 1, 100
  config.stages = "teacher,students,analysis"
  # MLPs: vmapped replicas are not slow on XLA:CPU and compile one step per group, not one per
  # replica. Groups are the same under either execution.
  config.execution = "vmap"
  for key, value in overrides.items():
    node, *path, leaf = [config] + key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def test_rows_and_groups_of_a_two_capacity_study():
  study = study_lib.resolve(_config())
  assert [(t.index, t.model) for t in study.teacher.replicas] == [(0, NARROW), (1, WIDE)]
  rows = [(r.arm, r.seed, r.teacher, r.teacher_model) for r in study.students.replicas]
  assert rows == [("kd", 0, 0, NARROW), ("kd", 1, 0, NARROW), ("kd", 0, 1, WIDE),
                  ("kd", 1, 1, WIDE), ("onehot", 0, -1, ""), ("onehot", 1, -1, "")]
  groups = [(g.key, g.model.label, g.indices, g.teacher_group, g.teacher_indices)
            for g in study.students.groups]
  # Students without a teacher join the first program of their model.
  assert groups == [("group0", NARROW, (0, 1, 4, 5), "group0", (0,)),
                    ("group1", NARROW, (2, 3), "group1", (1,))]
  assert [(g.key, g.model.label, g.indices) for g in study.teacher.groups] == [
      ("group0", NARROW, (0,)), ("group1", WIDE, (1,))]


def test_self_distillation_at_several_widths_pairs_each_width_with_its_own_teacher():
  config = _config(teacher_model="", arms="kd,siddo", student_init="teacher")
  config.model_grid.width = "0.05,0.1"
  study = study_lib.resolve(config)
  assert [t.model for t in study.teacher.replicas] == [NARROW, WIDE]
  for r in study.students.replicas:
    assert study.teacher.replicas[r.teacher].model == r.model, r
  assert len(study.students.groups) == 2


def test_identical_init_needs_a_teacher_of_the_students_model():
  with pytest.raises(study_lib.ConfigError, match="teacher_model.*no teacher model is "
                     r"mlp\(width=0.2\)"):
    study_lib.resolve(_config(**{"student_init": "teacher", "model_kwargs.width": 0.2}))


# ---------------------------------------------------------------- studies in this process


def config_from_flags(args: list[str], config: str = _cli.CONFIG) -> ml_collections.ConfigDict:
  """The config of `python -m kdjax.main CONFIG ARGS` (`config`: its --config flag; `args`: its
  --config.KEY=VALUE flags), parsed by the same ml_collections flag parser."""
  argv = ["kdjax.main", config, *args]
  values = flags.FlagValues()
  # The overrides are defined from the argv the flag will parse.
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def run_in_process(config: ml_collections.ConfigDict, workdir, stages=None) -> None:
  """Runs `stages` (default: the config's) of the study in `workdir` as kdjax.main runs them,
  in this process: config.json as kdjax.main writes it, then kdjax.train.run_stage for each
  training stage and kdjax.analysis.run, compiled with `optimizations_disabled`. A test that is
  not about the command line saves the 8-10 s of CPU a new process spends importing JAX and
  TensorFlow. Unlike kdjax.main: no workdir lock, no check of what the workdir already holds,
  and report.md records no command."""
  study = study_lib.resolve(config)
  workdir = str(workdir)
  os.makedirs(workdir, exist_ok=True)
  record = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k != "mesh"}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(json.dumps(record, indent=2, sort_keys=True))
  with optimizations_disabled():
    for stage in stages or study.stages:
      if stage == "analysis":
        analysis.run(workdir)
      else:
        train.run_stage(study, stage, workdir)


def _train(config, workdir: str):
  run_in_process(config, workdir, stages=("teacher", "students"))
  study = study_lib.resolve(config)
  return study, {stage: train.load_final_state(study, workdir, stage)[1]
                 for stage in ("teacher", "students")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("groups")
  both = _train(_config(), str(base / "both"))
  wide_only = _train(_wide_only_config(), str(base / "wide"))
  return base, both, wide_only


def _wide_only_config():
  """The wide teacher alone (no capacity grid) and kd students that learn from it."""
  config = _config(arms="kd")
  config.teacher_model_kwargs.width = 0.1
  config.teacher_model_grid = type(config.teacher_model_grid)()
  return config


def _leaves(state, rows=None):
  leaves = [np.asarray(a) for a in jax.tree.leaves(state.params)]
  return leaves if rows is None else [a[rows] for a in leaves]


def test_each_group_ends_where_a_study_of_that_model_alone_ends(trained):
  _, (_, both), (_, alone) = trained
  for a, b in zip(_leaves(both["teacher"]["group1"]), _leaves(alone["teacher"]["group0"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Students 2, 3 (kd from the wide teacher) are group1's replicas 0, 1.
  for a, b in zip(_leaves(both["students"]["group1"]), _leaves(alone["students"]["group0"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The two teachers really differ in capacity.
  widths = [jax.tree.leaves(both["teacher"][k].params)[0].shape for k in ("group0", "group1")]
  assert widths[0] != widths[1]


def test_the_analysis_keeps_the_teacher_models_apart(trained):
  base, (study, _), _ = trained
  workdir = str(base / "both")
  results = analysis.run(workdir)
  names = list(results["groups"])
  assert names == [f"kd[teacher={NARROW}]", f"kd[teacher={WIDE}]", "onehot"]
  assert results["groups"][f"kd[teacher={WIDE}]"]["replicas"] == [2, 3]
  preds = np.load(os.path.join(workdir, "analysis", "predictions.npz"))
  assert list(preds["teacher_model"]) == [NARROW, WIDE]
  np.testing.assert_array_equal(preds["replica_teacher"], [0, 0, 1, 1, 0, 1])
  # Each kd student is compared with its own teacher: recompute agreement with numpy.
  teacher_pred = np.argmax(preds["teacher_logits"], -1)
  student_pred = np.argmax(preds["student_logits"], -1)
  for r, record in enumerate(results["replicas"]):
    expected = np.mean(student_pred[r] == teacher_pred[preds["replica_teacher"][r]])
    assert record["metrics"]["agreement"] == pytest.approx(expected, abs=1e-6)
  with open(os.path.join(workdir, "students", "replicas.json")) as f:
    metadata = json.load(f)
  assert [g["replicas"] for g in metadata["groups"]] == [[0, 1, 4, 5], [2, 3]]


def test_kd_students_learn_from_each_augmentation_preset_of_the_teachers():
  """teacher_augment none,strong: every seed gets a kd student of each teacher (a standard and a
  heavily augmented one, arXiv 2510.12615); rcd and siddo, which do not read their teacher's
  predictions, are not duplicated."""
  config = _config(teacher_model="", arms="kd,rcd,siddo", student_init="teacher",
                   teacher_augment="none,strong")
  study = study_lib.resolve(config)
  assert [(t.index, t.augment, t.seed) for t in study.teacher.replicas] == [
      (0, "none", 0), (1, "strong", 0)]
  rows = [(r.arm, r.seed, r.teacher, r.teacher_augment) for r in study.students.replicas]
  assert rows == [("kd", 0, 0, "none"), ("kd", 1, 0, "none"), ("kd", 0, 1, "strong"),
                  ("kd", 1, 1, "strong"), ("rcd", 0, 0, ""), ("rcd", 1, 1, ""),
                  ("siddo", 0, 0, ""), ("siddo", 1, 1, "")]
