"""Divergence isolation, with real processes: a learning-rate grid in which one value is far too
large drives that student to NaN; it is frozen at its last finite parameters, warned about,
marked `diverged` in its checkpoint metadata and metrics.json and left out of the statistics,
while its neighbours train exactly as they do in a study without it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A 12-unit MLP on digits, 12 steps: seconds per run. Seeds 0, 1 at each learning rate.
STUDY = ["--config.model=mlp", "--config.model_kwargs.width=0.05", "--config.arms=kd",
         "--config.num_seeds=2", "--config.num_epochs=1", "--config.batch_size=100",
         "--config.log_every_steps=1", "--config.eval_every_steps=6"]
BAD_LR = 1e6


def _run(workdir: pathlib.Path, learning_rates: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "kdjax.main", f"--config={ROOT / 'configs' / 'default.py'}",
             f"--workdir={workdir}", *STUDY, f"--config.optimizer.learning_rate={learning_rates}"]
  return subprocess.run(command, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("divergence")
  out = {}
  for name, lrs in (("grid", f"0.1,{BAD_LR:g}"), ("alone", "0.1")):
    out[name] = (base / name, _run(base / name, lrs))
  return out


def _final_params(workdir: pathlib.Path):
  from kdjax import study as study_lib, train  # pylint: disable=g-import-not-at-top
  with open(workdir / "config.json") as f:
    study = study_lib.resolve(ml_collections.ConfigDict(json.load(f)))
  _, states = train.load_final_state(study, str(workdir), "students")
  (state,) = states.values()
  return study, jax.tree.map(np.asarray, state.params), np.asarray(state.diverged)


def test_the_diverged_replica_is_frozen_marked_and_excluded(runs):
  workdir, proc = runs["grid"]
  assert proc.returncode == 0, proc.stderr[-3000:]
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
  (grid_dir, grid), (alone_dir, alone) = runs["grid"], runs["alone"]
  assert grid.returncode == 0 and alone.returncode == 0, (grid.stderr + alone.stderr)[-3000:]
  _, grid_params, _ = _final_params(grid_dir)
  _, alone_params, diverged = _final_params(alone_dir)
  assert not diverged.any()
  for g, a in zip(jax.tree.leaves(grid_params), jax.tree.leaves(alone_params)):
    np.testing.assert_allclose(g[:2], a, rtol=1e-6, atol=1e-7)
