"""Divergence isolation, with a real process: a learning-rate grid in which one value is far too
large drives that student to NaN; it is frozen at its last finite parameters, warned about,
marked `diverged` in its checkpoint metadata and metrics.json and left out of the statistics,
while its neighbours train exactly as they do in a study without it (trained in this process)."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

import _cli
from test_groups import config_from_flags, run_in_process

# A 12-unit MLP on digits, 12 steps: seconds per run. Seeds 0, 1 at each learning rate.
STUDY = ["--config.model=mlp", "--config.model_kwargs.width=0.05", "--config.arms=kd",
         "--config.num_seeds=2", "--config.num_epochs=1", "--config.batch_size=100",
         "--config.log_every_steps=1", "--config.eval_every_steps=6"]
BAD_LR = 1e6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"grid": (workdir, the finished process)} of the study with the bad learning rate
  (`python -m kdjax.main`; JAX_DISABLE_MOST_OPTIMIZATIONS=1 halves XLA:CPU's compile time, most
  of the run: tests/test_engine_training.py, `optimizations_disabled`), and {"alone": workdir}
  of the study without it: its students stage only, run in this process (tests/test_groups.py,
  `run_in_process`), from a copy of the grid's teacher checkpoints; both studies' teachers are
  the same (teachers train with the first learning rate of the grid) and the comparison reads
  only the students' checkpoints."""
  base = tmp_path_factory.mktemp("divergence")
  grid, alone = base / "grid", base / "alone"
  env = dict(_cli.env(), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = _cli.main([*STUDY, f"--config.optimizer.learning_rate=0.1,{BAD_LR:g}"], grid, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  shutil.copytree(grid / "teacher", alone / "teacher")
  run_in_process(config_from_flags([*STUDY, "--config.optimizer.learning_rate=0.1"]), alone,
                 stages=("students",))
  return {"grid": (grid, proc), "alone": alone}


def _final_params(workdir: pathlib.Path):
  from kdjax import study as study_lib, train  # pylint: disable=g-import-not-at-top
  with open(workdir / "config.json") as f:
    study = study_lib.resolve(ml_collections.ConfigDict(json.load(f)))
  _, states = train.load_final_state(study, str(workdir), "students")
  (state,) = states.values()
  return study, jax.tree.map(np.asarray, state.params), np.asarray(state.diverged)


def test_the_diverged_replica_is_frozen_marked_and_excluded(runs):
  workdir, proc = runs["grid"]
  study, params, diverged = _final_params(workdir)
  bad = [r.index for r in study.students.replicas if r.learning_rate == BAD_LR]
  assert bad == [2, 3]
  np.testing.assert_array_equal(diverged, [False, False, True, True])
  # Frozen at its last finite parameters, not NaN.
  for leaf in jax.tree.leaves(params):
    assert np.isfinite(leaf).all()
  # One warning per diverged replica, naming it and its learning rate.
  warnings = [l for l in proc.stderr.splitlines() if "diverged (NaN/inf" in l]
  assert len(warnings) == 2, proc.stderr[-3000:]
  for i, line in zip(bad, warnings):
    assert f"replica {i} (kd, seed {i - 2}" in line and "learning rate 1e+06" in line
  rows = json.loads((workdir / "students" / "replicas.json").read_text())["replicas"]
  assert [row["diverged"] for row in rows] == [False, False, True, True]
  results = json.loads((workdir / "analysis" / "metrics.json").read_text())
  assert [r["diverged"] for r in results["replicas"]] == [False, False, True, True]
  group = results["groups"]["kd[lr=1e+06]"]
  assert group["replicas"] == [] and group["excluded"] == [2, 3]  # "replicas": those included
  assert results["arms"]["kd[lr=1e+06]"]["accuracy"]["n"] == 0
  assert results["arms"]["kd[lr=0.1]"]["accuracy"]["n"] == 2


def test_the_neighbours_train_as_without_the_diverged_replica(runs):
  (grid_dir, _), alone_dir = runs["grid"], runs["alone"]
  _, grid_params, _ = _final_params(grid_dir)
  _, alone_params, diverged = _final_params(alone_dir)
  assert not diverged.any()
  for g, a in zip(jax.tree.leaves(grid_params), jax.tree.leaves(alone_params)):
    np.testing.assert_allclose(g[:2], a, rtol=1e-6, atol=1e-7)
