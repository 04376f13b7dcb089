"""kdjax/compilation.py: XLA:CPU's optimisation level and the persistent compilation cache change
how long compiling takes, never what is computed.

  * A few training steps of the default cnn (3 arms, so 3 block programs, and the model init)
    compiled at kdjax's level end bitwise where the same steps compiled with XLA's default -O3 end.
  * `python -m kdjax.main` with an empty cache (which it fills), with that cache (which it only
    reads: no new entry), and with the cache off end with bitwise the same checkpoints.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest

import _cli
from kdjax import compilation
from kdjax import data
from kdjax import study as study_lib
from kdjax import train
from kdjax.engine import Engine, Teachers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("environ,expected", [
    ({"KDJAX_COMPILATION_CACHE": "off"}, None),
    ({"KDJAX_COMPILATION_CACHE": "No", "JAX_COMPILATION_CACHE_DIR": "/j"}, None),
    ({"KDJAX_COMPILATION_CACHE": "/c", "JAX_COMPILATION_CACHE_DIR": "/j"}, "/c"),
    ({"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}, "/j"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/kdjax/jax"),
])
def test_cache_directory_from_the_environment(environ, expected):
  assert compilation.directory(environ) == expected


def test_cache_directory_defaults_to_the_users_cache():
  assert compilation.directory({}) == os.path.join(os.path.expanduser("~"), ".cache", "kdjax",
                                                   "jax")


def _train_steps(steps: int = 3):
  """Final student parameters after `steps` steps of kd, rcd and siddo students (1 seed each)
  distilled from an untrained teacher, all programs compiled by this call."""
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.num_seeds, config.stages = 1, "students"
  study = study_lib.load_data(study_lib.resolve(config))
  teacher = Engine(study, study.teacher.groups[0])
  engine = Engine(study, study.students.groups[0])
  teachers = jax.device_put(Teachers(variables=teacher.init_state().variables()),
                            engine.replicated)
  arrays = data.to_device(study.data["train"], engine.replicated)
  state = engine.init_state()
  _, order = engine.order_for_step(state, study.num_train)
  for _ in range(steps):
    state, _ = engine.train_step(state, order, arrays, teachers)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_the_optimisation_level_changes_no_result(monkeypatch):
  if jax.default_backend() != "cpu":
    pytest.skip("kdjax sets a compile option on CPU only")
  assert compilation.compiler_options() == {
      "xla_backend_optimization_level": compilation.CPU_OPTIMIZATION_LEVEL}
  ours = _train_steps()
  monkeypatch.setattr(compilation, "compiler_options", lambda: None)  # XLA's default, -O3
  jax.clear_caches()
  reference = _train_steps()
  assert len(ours) == len(reference)
  for a, b in zip(ours, reference):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(ours, _initial_params()))


def _initial_params():
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.num_seeds, config.stages = 1, "students"
  study = study_lib.load_data(study_lib.resolve(config))
  state = Engine(study, study.students.groups[0]).init_state()
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


STUDY = ["--config.model=mlp", "--config.num_seeds=1", "--config.num_epochs=1",
         "--config.teacher_num_epochs=1", "--config.stages=teacher,students"]


def test_a_cached_run_gives_bitwise_the_results_of_an_uncached_one(tmp_path):
  cache = tmp_path / "cache"
  runs = {}
  for name, setting in (("cold", cache), ("warm", cache), ("off", "off")):
    env = dict(_cli.env(), KDJAX_COMPILATION_CACHE=str(setting))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = _cli.main(STUDY, tmp_path / name, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[name] = sorted(os.listdir(cache))
  assert runs["cold"], "the first run wrote nothing to the cache"
  assert runs["warm"] == runs["cold"], "the second run compiled programs the first had cached"
  study = study_lib.load_data(study_lib.resolve(_cli_config()))
  final = {name: {stage: train.load_final_state(study, str(tmp_path / name), stage)[1]
                  for stage in ("teacher", "students")} for name in ("cold", "warm", "off")}
  for name in ("warm", "off"):
    for stage in ("teacher", "students"):
      for a, b in zip(jax.tree.leaves(final["cold"][stage]), jax.tree.leaves(final[name][stage])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name} {stage}")


def _cli_config():
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.model, config.num_seeds, config.num_epochs, config.teacher_num_epochs = "mlp", 1, 1, 1
  config.stages = "teacher,students"
  return config
