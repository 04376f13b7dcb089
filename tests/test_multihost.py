"""Tests of scale-out: the ('replica', 'data') mesh, several processes, and the launchers.

References: a 1-device run in this process (the engine's single-device path, which
tests/test_engine.py checks against a plain optax loop) for the multi-process run and for the
data axis; closed forms for the mesh arithmetic and the sweep's launch plan.

Cost (2 cores): the expensive parts run in subprocesses in a background thread while the
in-process reference trains: `launch/multiprocess.sh` with 2 processes x 2 CPU devices (gloo
collectives), stopped by a SIGTERM to one process as its students stage starts and launched
again (so one study checks both the multi-process results and the preemption path); a
2-device script that trains a tiny BatchNorm model with mesh data=2 and data=1; and the
analysis of the two-process workdir on 3 devices. They share a persistent compilation cache
with this process, which compiles the cnn init (the costliest compile, threefry on XLA:CPU)
before they start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

import _cli
from kdjax import distributed
from kdjax import engine as engine_lib
from kdjax import study as study_lib
from kdjax import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
# The small study of the multi-process test: 2 teachers, then kd and rcd students (1 seed each:
# kd distils from teacher 0, rcd reads noise), 1 epoch each: ceil(1198 / 128) = 10 steps, the
# last with 46 real examples (on the 2 x 2 mesh, data shard 0 holds them all, shard 1 none).
# Eval in 2 batches of 300 (599 = 300 + 299 padded).
STUDY = {"num_teachers": 2, "num_seeds": 1, "arms": "kd,rcd", "num_epochs": 1,
         "teacher_num_epochs": 1, "batch_size": 128, "eval_batch_size": 300,
         "model_kwargs.width": 0.125}


def _config(**overrides) -> ml_collections.ConfigDict:
  config = study_lib.load_config(str(ROOT / "configs" / "default.py"))
  config.update_from_flattened_dict({**STUDY, **overrides})
  return config


def _flags(**overrides) -> list[str]:
  return [f"--config.{k}={v}" for k, v in {**STUDY, **overrides}.items()]


# ---------------------------------------------------------------------------------- background


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  """A persistent compilation cache shared by this process and the subprocesses (restored
  afterwards), and the subprocesses' environment."""
  from jax.experimental.compilation_cache import compilation_cache as cache
  path = str(tmp_path_factory.mktemp("xla_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cache.reset_cache()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("KDJAX_", "JAX_COORDINATOR", "XLA_FLAGS"))}
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=path, PYTHON=sys.executable,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  yield env
  for n, v in old.items():
    jax.config.update(n, v)
  cache.reset_cache()


# Trains a tiny BatchNorm model (Dense 16, BatchNorm, ReLU, head) with mesh data=2 and with one
# device (data=1): the teacher stage with the 'unrolled' execution, then the students (kd, rcd)
# with 'vmap' (one compile of each is what the budget allows), 10 steps each, and saves every
# array the test compares. The model is registered here because no registry model with
# BatchNorm compiles in a few seconds on XLA:CPU.
DATA_AXIS_SCRIPT = textwrap.dedent("""
    import sys
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from kdjax import data, engine as engine_lib, models, study as study_lib
    from kdjax.models import _common

    class TinyBN(nn.Module):
      num_classes: int
      width: float = 1.0
      @nn.compact
      def __call__(self, x, *, train):
        x = nn.Dense(16, name="dense")(x.reshape((x.shape[0], -1)))
        x = nn.relu(_common.batch_norm(train, jnp.float32, "bn")(x))
        return _common.logits_f32(nn.Dense(self.num_classes, name="head")(x))

    models._REGISTRY["tiny_bn"] = (TinyBN, {})
    out, teachers = {}, None
    devices = jax.devices()
    meshes = {"data2": Mesh(np.array(devices).reshape(1, 2), ("replica", "data")),
              "data1": Mesh(np.array(devices[:1]).reshape(1, 1), ("replica", "data"))}
    for stage, execution in (("teacher", "unrolled"), ("students", "vmap")):
      config = study_lib.load_config("configs/default.py")
      config.update_from_flattened_dict(dict(
          model="tiny_bn", num_teachers=2, num_seeds=1, arms="kd,rcd", num_epochs=1,
          batch_size=128, eval_batch_size=300, execution=execution,
          **{"mesh.replica": 1, "mesh.data": 2}))
      study = study_lib.load_data(study_lib.fit_devices(study_lib.resolve(config), 2))
      out["mesh"] = np.array(study.mesh)
      (group,) = study.stage(stage).groups
      for name, mesh in meshes.items():
        e = engine_lib.Engine(study, group, mesh=mesh)
        assert e.execution == execution
        arrays = data.to_device(study.data["train"], e.replicated)
        placed = None if teachers is None else jax.device_put(teachers, e.replicated)
        state, losses = e.init_state(), []
        while int(state.step) < group.total_steps:
          _, order = e.order_for_step(state, study.num_train)
          state, metrics = e.train_step(state, order, arrays, placed)
          losses.append(np.asarray(metrics["loss"]))
        key = f"{execution}/{stage}/{name}"
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.variables())[0]:
          out[f"{key}/var{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        out[f"{key}/loss"] = np.stack(losses)
        evaluated = e.evaluate(state.variables(), data.to_device(study.data["test"],
                                                                 e.replicated), 300)
        out[f"{key}/eval_accuracy"] = evaluated["accuracy"]
        out[f"{key}/eval_loss"] = evaluated["loss"]
        if name == "data1":
          final = engine_lib.Teachers(variables=state.variables())
      teachers = final
    np.savez(sys.argv[1], **out)

    # Issue 16: mutual learning with the two cohort peers on different devices (replica=2) or
    # one device (data=2, data=1), and DIST's batch-level loss with the batch split (data=2).
    out = {}
    meshes["replica2"] = Mesh(np.array(devices).reshape(2, 1), ("replica", "data"))
    for arms, names in (("mutual", ("replica2", "data2", "data1")), ("dist", ("data2", "data1"))):
      config = study_lib.load_config("configs/default.py")
      config.update_from_flattened_dict(dict(
          model="tiny_bn", num_teachers=2, num_seeds=2, arms=arms, num_epochs=1,
          batch_size=128, eval_batch_size=300, execution="blocked", stages="students"))
      study = study_lib.load_data(study_lib.resolve(config))
      (group,) = study.students.groups
      for name in names:
        e = engine_lib.Engine(study, group, mesh=meshes[name])
        arrays = data.to_device(study.data["train"], e.replicated)
        placed = jax.device_put(teachers, e.replicated)
        state, losses = e.init_state(), []
        while int(state.step) < group.total_steps:
          _, order = e.order_for_step(state, study.num_train)
          state, metrics = e.train_step(state, order, arrays, placed)
          losses.append(np.asarray(metrics["loss"]))
        for path, leaf in jax.tree_util.tree_flatten_with_path(state.variables())[0]:
          out[f"{arms}/{name}/var{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        out[f"{arms}/{name}/loss"] = np.stack(losses)
    np.savez(sys.argv[1] + ".issue16.npz", **out)
""")


# Runs the multi-process launch (the command in argv[1], JSON) and sends SIGTERM to its
# process 1 once process 0 prints the students stage's header; records the exit status and
# the logs of that launch, then execs the same launch again (its output and exit status are
# the job's).
PREEMPT_SCRIPT = textwrap.dedent("""
    import json, os, pathlib, signal, subprocess, sys, time

    command, base = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2])

    def descendants(pid):
      children = {}
      for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
          continue
        try:
          ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
          continue
        children.setdefault(ppid, []).append(int(entry.name))
      out, todo = [], [pid]
      while todo:
        for child in children.get(todo.pop(), []):
          out.append(child)
          todo.append(child)
      return out

    def worker(launcher, index):
      for pid in descendants(launcher):
        try:
          environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0")
          cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
          continue
        if f"KDJAX_PROCESS_ID={index}".encode() in environ and b"kdjax.main" in cmdline:
          return pid
      sys.exit(f"no process {index} under the launcher")

    log = base / "first_launch.log"
    with open(log, "w") as out:
      launcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    while "[students] 2 replicas" not in log.read_text():
      if launcher.poll() is not None:
        sys.exit(f"the first launch ended ({launcher.returncode}) before the students stage")
      time.sleep(0.05)
    os.kill(worker(launcher.pid, 1), signal.SIGTERM)
    returncode = launcher.wait()
    (base / "logs" / "process_1.log").rename(base / "first_launch_process_1.log")
    (base / "first_launch.json").write_text(json.dumps({"returncode": returncode}))
    sys.stdout.flush()
    os.execvp(command[0], command)
""")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, cache_env):
  base = tmp_path_factory.mktemp("multihost")
  script = base / "data_axis.py"
  script.write_text(DATA_AXIS_SCRIPT)
  (base / "preempt.py").write_text(PREEMPT_SCRIPT)
  launch = [str(LAUNCH / "multiprocess.sh"), "--processes", "2", "--devices-per-process", "2",
            "--log-dir", str(base / "logs"), "--", f"--config={ROOT / 'configs' / 'default.py'}",
            f"--workdir={base / 'workdir'}", "--config.stages=teacher,students,analysis",
            *_flags()]  # no mesh: each group's is chosen (2 replicas on 4 devices: 2 x 2)
  # 2 CPU devices for the data-axis script; the launcher sets its processes' own count.
  two_devices = dict(cache_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  background = _cli.BackgroundJobs({
      # Stopped by SIGTERM to process 1 as the students stage starts, then launched again.
      "two_processes": ([sys.executable, str(base / "preempt.py"), json.dumps(launch),
                         str(base)], base / "two_processes.log"),
      "data_axis": ([sys.executable, str(script), str(base / "data_axis.npz")],
                    base / "data_axis.log"),
      # The pod's workdir (replica axis 2) analysed on a host with 3 devices, in a copy: the
      # in-process tests read the original meanwhile.
      "analysis_3_devices": (
          ["bash", "-c", 'cp -r "$1" "$2" && XLA_FLAGS=--xla_force_host_platform_device_count=3 '
           'exec "$3" -m kdjax.main "${@:4}"', "bash", str(base / "workdir"),
           str(base / "analysed_on_3"), sys.executable,
           f"--config={ROOT / 'configs' / 'default.py'}", f"--workdir={base / 'analysed_on_3'}",
           "--config.stages=analysis", *_flags()],
          base / "analysis_3_devices.log"),
  }, two_devices, base=base)
  yield background
  background.close()


@pytest.fixture(scope="module")
def study():
  return study_lib.resolve(_config())


@pytest.fixture(scope="module")
def reference(study, jobs, tmp_path_factory):
  """The study trained in this process on 1 device; the background jobs start once the cnn's
  init (shared through the compilation cache) has compiled."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  (group,) = study.teacher.groups
  engine_lib.Engine(study, group).init_state()
  jobs.start()
  train.run_stage(study, "teacher", workdir)
  train.run_stage(study, "students", workdir)
  return workdir


# ---------------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("mesh,devices,expected", [
    (None, 1, (1, 1)), (None, 8, (8, 1)), ({"replica": -1, "data": 2}, 8, (4, 2)),
    ({"replica": 2, "data": -1}, 8, (2, 4)), ({"replica": 2, "data": 2}, 4, (2, 2)),
    ({"data": 4}, 4, (1, 4)), ({"replica": 0, "data": 2}, 8, (4, 2))])
def test_mesh_shape_fills_the_devices(mesh, devices, expected):
  assert study_lib.mesh_shape(mesh, devices) == expected


@pytest.mark.parametrize("mesh,devices,key,words", [
    ({"replica": -1, "data": 3}, 4, "mesh.data", ["divide the 4 devices", "3"]),
    ({"replica": 2, "data": 2}, 8, "mesh.replica", ["2 x 2 = 4", "8 devices"]),
    ({"replica": -1, "data": -1}, 4, "mesh.data", ["at most one"]),
    ({"replica": -2, "data": 1}, 4, "mesh.replica", [">= 1", "-1", "0"]),
    ({"replica": 1.5, "data": 1}, 1, "mesh.replica", ["integer", "1.5"]),
    ({"model": 2}, 2, "mesh.model", ["replica, data"])])
def test_mesh_shape_names_the_bad_key(mesh, devices, key, words):
  with pytest.raises(study_lib.ConfigError) as info:
    study_lib.mesh_shape(mesh, devices)
  assert info.value.key == key
  message = str(info.value)
  assert message.startswith(f"--config.{key}: ") and "\n" not in message
  for w in words:
    assert w in message, message


@pytest.mark.parametrize("group_size,devices,batches,expected", [
    (1, 4, (64, 600), (1, 4)), (24, 4, (64, 600), (4, 1)), (6, 4, (64, 600), (2, 2)),
    (1, 4, (130, 600), (1, 2)), (3, 8, (64, 600), (1, 8)), (2, 3, (128, 300), (1, 1)),
    (8, 8, (64,), (8, 1)), (1, 1, (7,), (1, 1))])
def test_auto_mesh_takes_whole_replicas_first_then_splits_batches(group_size, devices, batches,
                                                                   expected):
  """The largest replica axis dividing the group and the devices, then the largest data axis
  dividing the devices left and every batch (enumerated here by hand)."""
  assert study_lib.auto_mesh(group_size, devices, batches) == expected


def test_the_default_mesh_is_chosen_per_group_and_an_explicit_one_is_strict():
  """With `mesh` left at its default, a study of 1 teacher and 6 students resolves on any
  device count, each group with its own mesh; an explicit mesh keeps today's checks."""
  config = _config(num_teachers=1, num_seeds=3)
  assert study_lib.is_auto_mesh(config.mesh) and not study_lib.is_auto_mesh({"data": 2})
  study = study_lib.fit_devices(study_lib.resolve(config), 4)
  assert study.mesh_request is None and study.mesh is None
  assert [study.group_mesh(g) for g in (*study.teacher.groups, *study.students.groups)] == \
      [(1, 4), (2, 2)]
  assert study.group_mesh(study.students.groups[0], 6) == (6, 1)


def test_study_checks_replicas_and_batches_against_the_mesh():
  """On 4 devices: 2 teachers do not divide over 4 replica shards but do over 2 (data=2);
  a batch of 130 does not split over data=4; the fitted mesh is recorded in the Study. Every
  one is a MeshError (a ConfigError) raised by the device step, not by `resolve`."""
  fit = lambda devices, **overrides: study_lib.fit_devices(
      study_lib.resolve(_config(**overrides)), devices)
  with pytest.raises(study_lib.MeshError) as info:
    fit(4, **{"mesh.data": 1})
  assert info.value.key == "num_teachers"
  assert "2 replicas" in str(info.value) and "multiple of 4" in str(info.value)
  assert info.value.fits == [(2, 2), (1, 4)]
  assert fit(4, **{"mesh.data": 2}).mesh == (2, 2)
  with pytest.raises(study_lib.MeshError) as info:
    fit(4, batch_size=130, **{"mesh.data": 4})
  assert info.value.key == "batch_size" and "mesh.data=4" in str(info.value)
  with pytest.raises(study_lib.MeshError) as info:
    fit(2, eval_batch_size=301, **{"mesh.data": 2})
  assert info.value.key == "eval_batch_size"


# ---------------------------------------------------------------------------------- environment


def test_distributed_settings_from_the_environment():
  """Explicit local processes, JAX's own detection on request, and nothing otherwise; a bad
  variable is a ValueError naming it."""
  assert distributed.settings({}) is None
  assert distributed.settings({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) is None
  assert distributed.settings({"KDJAX_DISTRIBUTED": "auto"}) == {}
  assert distributed.settings({"KDJAX_DISTRIBUTED": "off", "KDJAX_NUM_PROCESSES": "2"}) is None
  assert distributed.settings({"KDJAX_NUM_PROCESSES": "2", "KDJAX_PROCESS_ID": "1"}) == {
      "coordinator_address": distributed.DEFAULT_COORDINATOR, "num_processes": 2,
      "process_id": 1, "cluster_detection_method": "deactivate"}
  assert distributed.settings({"KDJAX_NUM_PROCESSES": "4", "KDJAX_PROCESS_ID": "0",
                               "JAX_COORDINATOR_ADDRESS": "10.0.0.1:9999"})[
                                   "coordinator_address"] == "10.0.0.1:9999"
  for env, name in (({"KDJAX_NUM_PROCESSES": "2"}, "KDJAX_PROCESS_ID"),
                    ({"KDJAX_NUM_PROCESSES": "2", "KDJAX_PROCESS_ID": "2"}, "KDJAX_PROCESS_ID"),
                    ({"KDJAX_NUM_PROCESSES": "0", "KDJAX_PROCESS_ID": "0"},
                     "KDJAX_NUM_PROCESSES"),
                    ({"KDJAX_NUM_PROCESSES": "two", "KDJAX_PROCESS_ID": "0"},
                     "KDJAX_NUM_PROCESSES"),
                    ({"KDJAX_NUM_PROCESSES": "2", "KDJAX_PROCESS_ID": "0",
                      "JAX_COORDINATOR_ADDRESS": "localhost"}, "JAX_COORDINATOR_ADDRESS"),
                    ({"KDJAX_DISTRIBUTED": "yes"}, "KDJAX_DISTRIBUTED")):
    with pytest.raises(ValueError, match=name):
      distributed.settings(env)


# ---------------------------------------------------------------------------------- data axis


def test_data_axis_gives_the_results_of_one_device(jobs, reference):
  """A BatchNorm model trained with each replica's batch split over 2 devices (mesh data=2)
  ends where one device ends: parameters, BatchNorm statistics, per-step losses (the padded
  last batch's 46 real examples all sit on shard 0) and eval, for teachers ('unrolled') and
  for kd/rcd students ('vmap'; RCD noise drawn for the whole batch). Without synchronised
  statistics or with per-shard loss means the statistics and parameters would differ.
  (`reference` only orders it: the job runs in the background while the reference trains.)"""
  del reference
  jobs.result("data_axis")
  out = dict(np.load(jobs.base / "data_axis.npz"))
  assert tuple(out.pop("mesh")) == (1, 2)
  keys = sorted(k for k in out if "/data2/" in k)
  assert any("batch_stats" in k for k in keys) and any("students" in k for k in keys)
  assert len(keys) == len(out) // 2
  for key in keys:
    ours, ref = out[key], out[key.replace("/data2/", "/data1/")]
    if key.endswith("eval_accuracy"):
      np.testing.assert_allclose(ours, ref, atol=1.5 / 599, err_msg=key)  # a flipped argmax
    else:
      np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-5, err_msg=key)
  # The runs did train: the students' BatchNorm statistics moved away from their init.
  assert {k.split("/")[0] for k in keys} == {"unrolled", "vmap"}
  moved = [k for k in keys if "students" in k and "batch_stats" in k and "mean" in k]
  assert moved and all(np.abs(out[k]).max() > 1e-3 for k in moved)


def test_mutual_peers_on_other_devices_and_dist_over_the_data_axis_match_one_device(jobs,
                                                                                   reference):
  """Mutual learning whose two cohort peers sit on different devices (mesh replica=2) or whose
  batch is split (data=2), and DIST, whose intra-class term correlates each class across the
  whole batch, with the batch split over data=2: parameters, BatchNorm statistics and per-step
  losses equal one device's (the same job as the data-axis test)."""
  del reference
  jobs.result("data_axis")
  out = dict(np.load(str(jobs.base / "data_axis.npz") + ".issue16.npz"))
  compared = 0
  for key in sorted(out):
    arms, name, rest = key.split("/", 2)
    if name == "data1":
      continue
    np.testing.assert_allclose(out[key], out[f"{arms}/data1/{rest}"], rtol=2e-4, atol=2e-5,
                               err_msg=key)
    compared += 1
  assert compared and {k.split("/")[1] for k in out} == {"replica2", "data2", "data1"}
  assert any(k.startswith("dist/data2/var") and "batch_stats" in k for k in out)


# ---------------------------------------------------------------------------------- 2 processes


def _event_scalars(stage_dir, launches: int = 1) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the stage's event files: one per launch, process 0's alone."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars: dict[str, dict[int, float]] = {}
  files = sorted(pathlib.Path(stage_dir).glob("events.out.tfevents.*"))
  assert len(files) == launches, f"expected {launches} event files in {stage_dir}: {files}"
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else \
            value.simple_value
        scalars.setdefault(value.tag, {})[event.step] = float(number)
  return scalars


@pytest.fixture(scope="module")
def two_process_workdir(jobs, reference):
  del reference  # trained first: the jobs start from it
  output = jobs.result("two_processes")
  return jobs.base / "workdir", output


def test_two_processes_reach_the_results_of_one(study, reference, two_process_workdir):
  """2 processes x 2 CPU devices with no mesh flag (each group's mesh chosen: replica=2 x
  data=2, the same in every process: each process trains its own
  replica, each replica's batch split over the process's 2 devices), stopped by SIGTERM and
  launched again, end where 1 device ends without a stop, per replica, up to the order of
  reductions; the eval scalars they log match; only process 0 prints and writes TensorBoard
  events (one file per launch)."""
  workdir, output = two_process_workdir
  assert ("4 cpu device(s)), 10 steps; mesh replica=2 x data=2 (chosen per group: "
          "--config.mesh sets one) over 2 processes") in output
  assert "[analysis] skipped" in output  # the analysis runs on one host
  other = (workdir.parent / "logs" / "process_1.log").read_text()
  assert "[teacher]" not in other and "[students]" not in other, other[-2000:]
  for stage in ("teacher", "students"):
    ours = train.load_final_state(study, str(workdir), stage)[1]["group0"]
    ref = train.load_final_state(study, reference, stage)[1]["group0"]
    assert int(ours.step) == int(ref.step) == 10
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours.params)[0],
                            jax.tree.leaves(ref.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                 err_msg=f"{stage} {jax.tree_util.keystr(path)}")
    theirs = _event_scalars(workdir / stage, launches=2)
    mine = _event_scalars(pathlib.Path(reference) / stage)
    evals = sorted(t for t in mine if t.endswith(("eval_accuracy", "eval_loss")))
    assert evals and evals == sorted(t for t in theirs if t.endswith(
        ("eval_accuracy", "eval_loss")))
    for tag in evals:
      tolerance = dict(abs=1.5 / 599) if tag.endswith("accuracy") else dict(rel=1e-4)
      assert theirs[tag][10] == pytest.approx(mine[tag][10], **tolerance), tag


def test_two_process_checkpoint_restores_in_one_process(study, two_process_workdir):
  """The checkpoint both processes wrote loads in this 1-device process (what the analysis
  stage does on a workstation): every replica, on this process's device, with its identity.
  config.json leaves the pod's mesh out, so the analysis resolves the study for this host."""
  workdir, _ = two_process_workdir
  from kdjax.analysis import predictions  # pylint: disable=g-import-not-at-top
  assert "mesh" not in json.loads((workdir / "config.json").read_text())
  loaded = predictions.load_study(str(workdir))  # the default mesh, laid out on this host
  assert loaded.mesh is None and loaded.group_mesh(loaded.students.groups[0]) == (1, 1)
  engines, states = train.load_final_state(study, str(workdir), "students")
  state = states["group0"]
  assert engines[0].mesh.devices.size == 1
  for leaf in jax.tree.leaves(state):
    assert leaf.is_fully_addressable and len(leaf.sharding.device_set) == 1
  assert np.asarray(state.params["head"]["kernel"]).shape[0] == 2
  with open(workdir / "students" / "replicas.json") as f:
    rows = json.load(f)["replicas"]
  assert [(r["arm"], r["seed"], r["teacher"]) for r in rows] == [("kd", 0, 0), ("rcd", 0, 0)]


# ---------------------------------------------------------------------------------- meshes that fit


@pytest.mark.parametrize("sizes,devices,batches,expected", [
    ([2, 2], 3, (), [(1, 3)]), ([2, 2], 4, (), [(2, 2), (1, 4)]),
    ([8, 16], 8, (), [(8, 1), (4, 2), (2, 4), (1, 8)]), ([1, 24], 4, (64, 600), [(1, 4)]),
    ([2, 2], 3, (128, 300), []), ([3], 6, (4,), [(3, 2)]), ([5], 1, (7,), [(1, 1)])])
def test_fitting_meshes(sizes, devices, batches, expected):
  assert distributed.fitting_meshes(sizes, devices, batches) == expected


def test_the_analysis_lays_a_study_out_on_any_number_of_devices(study):
  """Groups of 2 replicas: on 8 devices replica=2 x data=4; on 7, replica=1 x data=7 and the
  eval batch of 300 rounded up to 301 (a multiple of 7); the study itself is unchanged."""
  from kdjax import analysis  # pylint: disable=g-import-not-at-top
  on_8 = analysis.fit_to_devices(study, 8)
  assert on_8.mesh == (2, 4) and on_8.mesh_request == {"replica": 2, "data": 4}
  assert on_8.run.eval_batch_size == 300
  assert [on_8.group_mesh(g) for g in on_8.groups()] == [(2, 4)] * len(study.groups())
  on_7 = analysis.fit_to_devices(study, 7)
  assert on_7.mesh == (1, 7) and on_7.run.eval_batch_size == 301
  assert study.run.eval_batch_size == 300 and on_7.students == study.students


def test_the_mesh_error_names_the_meshes_that_fit_and_an_analysis_alone_needs_none():
  """Groups of 2 replicas, batches of 128 and 300: on 4 devices replica=4 does not fit, (2, 2)
  and (1, 4) do; on 6 devices nothing does (data 3 or 6 splits no batch of 128). An
  analysis-only run is resolved whatever the devices (it lays out its own mesh). kdjax.main
  turns the ConfigError into its one line and exit 2, as for any key (tests/test_cli.py)."""
  from kdjax import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(study_lib.ConfigError) as info:
    main.resolve(_config(**{"mesh.replica": 4}), num_devices=4)
  assert info.value.key == "num_teachers" and "\n" not in str(info.value)
  assert str(info.value).endswith(
      "; meshes that fit the 4 devices: --config.mesh.replica=2 --config.mesh.data=2 or "
      "--config.mesh.replica=1 --config.mesh.data=4"), str(info.value)
  with pytest.raises(study_lib.ConfigError, match=r"; no mesh of the 6 devices fits: "
                     r"mesh.replica must divide every group's replica count \(2\)"):
    main.resolve(_config(**{"mesh.data": 1}), num_devices=6)
  assert main.resolve(_config(stages="analysis", **{"mesh.data": 1}),
                      num_devices=3).num_devices is None  # not fitted: the analysis lays out


def test_a_pod_workdir_analyses_on_a_host_whose_devices_it_does_not_divide(jobs,
                                                                          two_process_workdir,
                                                                          tmp_path):
  """The 2 x 2 pod's workdir (replica axis 2) analysed with 3 devices picks replica=1 x data=3
  and says so; its predictions and metrics are those of an analysis of the same checkpoints on
  this process's 1 device, up to float rounding."""
  from kdjax import analysis  # pylint: disable=g-import-not-at-top
  workdir, _ = two_process_workdir
  output = jobs.result("analysis_3_devices")
  assert ("[analysis] mesh replica=1 x data=3 on 3 cpu devices (the largest replica axis "
          "dividing every group's replica count: 2; eval batch 300)") in output, output[-3000:]
  one_device = tmp_path / "one_device"
  shutil.copytree(workdir, one_device, ignore=shutil.ignore_patterns("analysis"))
  expected = analysis.run(str(one_device))
  ours = np.load(jobs.base / "analysed_on_3" / "analysis" / "predictions.npz")
  theirs = np.load(one_device / "analysis" / "predictions.npz")
  assert sorted(ours.files) == sorted(theirs.files)
  for key in theirs.files:
    if theirs[key].dtype.kind == "f":
      np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)
    else:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  got = json.loads((jobs.base / "analysed_on_3" / "analysis" / "metrics.json").read_text())
  for mine, want in zip(got["replicas"], expected["replicas"]):
    assert mine["metrics"] == pytest.approx(analysis.strict_json(want["metrics"]), abs=1e-5)


# ---------------------------------------------------------------------------------- SIGTERM


def test_sigterm_to_one_process_stops_both_after_the_same_step_and_the_relaunch_resumes(
    jobs, two_process_workdir):
  """The two-process run of the jobs got SIGTERM in process 1 only, as its students stage
  started: JAX's preemption sync stopped both processes after the same step, both saved it
  (one collective checkpoint) and exited 143 with one line; the same command launched again
  resumed from that step (and reached the 1-device results:
  test_two_processes_reach_the_results_of_one)."""
  _, output = two_process_workdir
  assert json.loads((jobs.base / "first_launch.json").read_text()) == {"returncode": 143}
  stops = []
  for log in ("first_launch.log", "first_launch_process_1.log"):
    text = (jobs.base / log).read_text()
    match = re.search(r"^kdjax: stopped by SIGTERM at step (\d+) of 10 of the students stage; "
                      "checkpoint saved; rerun the same command to resume$", text, re.MULTILINE)
    assert match and "Traceback" not in text, text[-3000:]
    stops.append(int(match[1]))
  assert stops[0] == stops[1] < 10, stops
  assert "[teacher] already finished (checkpoint step 10)" in output
  assert f"students: resuming from checkpoint step {stops[0]} of 10" in output


# ---------------------------------------------------------------------------------- sweep


def _sweep():
  name = "kdjax_launch_sweep"
  if name not in sys.modules:  # dataclasses look their module up in sys.modules
    spec = importlib.util.spec_from_file_location(name, LAUNCH / "sweep.py")
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])
  return sys.modules[name]


def test_sweep_keeps_a_fitting_grid_in_one_launch_and_splits_one_that_does_not():
  """4 teachers; kd and rcd at 3 alphas x 4 seeds + siddo's 4 seeds = 28 students: 7 per device
  on 4 devices. A budget of 7 per device is one launch; of 3 per device, one alpha per launch
  (4 + 4 + 4 = 12 students, 3 per device; two alphas would make 20, 5 per device), each launch
  with its own workdir and the forwarded overrides; a budget of 2 is not met even by one alpha
  per launch, and 3 teachers on 4 devices never fit an explicit mesh with data=1 (splitting does
  not change them), while the default mesh lays them out on data=4."""
  sweep = _sweep()
  config = _config(num_teachers=4, num_seeds=4, arms="kd,rcd,siddo", alpha="0.1,0.5,0.9")
  (launch,) = sweep.plan(config, devices=4, workdir="runs/s", max_per_device=7)
  assert launch.overrides == {} and launch.workdir == "runs/s"
  assert launch.replicas_per_device == {"teacher": 1, "students": 7}

  launches = sweep.plan(config, devices=4, workdir="runs/s", max_per_device=3)
  assert [l.overrides for l in launches] == [{"alpha": "0.1"}, {"alpha": "0.5"}, {"alpha": "0.9"}]
  assert [l.workdir for l in launches] == [f"runs/s/alpha_{i}" for i in range(3)]
  assert all(l.replicas_per_device["students"] == 3 for l in launches)
  commands = sweep.commands(launches, ["--config=c.py", "--config.alpha=0.1,0.5,0.9",
                                       "--config.num_seeds=4", "--workdir=old"],
                            "launch/multiprocess.sh --processes 2 --devices-per-process 2 --")
  assert commands[1] == ["launch/multiprocess.sh", "--processes", "2", "--devices-per-process",
                         "2", "--", "--config=c.py", "--config.num_seeds=4",
                         "--workdir=runs/s/alpha_1", "--config.alpha=0.5"]
  assert [c[0] for c in sweep.chunks(list("abcde"), 2)] == ["a", "d"]
  assert sweep.chunks(list("abcde"), 2) == [list("abc"), list("de")]

  with pytest.raises(ValueError, match="even one value of alpha"):
    sweep.plan(config, devices=4, workdir="runs/s", max_per_device=2)
  with pytest.raises(ValueError, match="num_teachers"):
    sweep.plan(_config(num_teachers=3, **{"mesh.data": 1}), devices=4, workdir="runs/s")
  # The default mesh lays 3 teachers out as replica=1 x data=4: one launch.
  (launch,) = sweep.plan(_config(num_teachers=3), devices=4, workdir="runs/s")
  assert launch.replicas_per_device["teacher"] == 3


# ---------------------------------------------------------------------------------- launchers


def _run(args, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize("script", ["multiprocess.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_launch_scripts_parse_and_explain_themselves(script):
  path = str(LAUNCH / script)
  assert _run(["bash", "-n", path]).returncode == 0
  shown = _run(["bash", path, "--help"])
  assert shown.returncode == 0 and "usage:" in shown.stdout and "kdjax.main" in shown.stdout
  bad = _run(["bash", path, "--no-such-option"], env={**os.environ, "SLURM_JOB_ID": ""})
  assert bad.returncode == 2 and bad.stdout == "" and "--help" in bad.stderr


def test_launch_scripts_reject_bad_arguments():
  mp = str(LAUNCH / "multiprocess.sh")
  for args, words in (([], "--processes"), (["--processes", "0"], "--processes"),
                      (["--processes", "2", "--devices-per-process", "x"], "devices-per-process"),
                      (["--processes", "2", "--devices-per-process", "2"], "after --")):
    proc = _run(["bash", mp, *args])
    assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
  tpu = str(LAUNCH / "tpu_pod.sh")
  proc = _run(["bash", tpu, "--name", "kd", "--zone", "z", "--workdir", "runs/x", "--", "x"])
  assert proc.returncode == 2 and "gs://" in proc.stderr
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  proc = _run(["bash", str(LAUNCH / "slurm.sbatch"), "--workdir=/shared/x"], env=env)
  assert proc.returncode == 2 and "sbatch" in proc.stderr


def test_tpu_pod_dry_run_runs_kdjax_on_every_worker():
  proc = _run(["bash", str(LAUNCH / "tpu_pod.sh"), "--name", "kd-v4", "--zone", "us-central2-b",
               "--accelerator-type", "v4-32", "--workdir", "gs://bucket/run", "--dry-run", "--",
               "--config=configs/default.py", "--config.arms=kd,rcd"])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create kd-v4 --zone us-central2-b "
                             "--accelerator-type v4-32")
  assert any(" scp " in l and "--worker=all" in l for l in lines)
  command = shlex.split(lines[-1])
  assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "kd-v4"], command
  assert "--worker=all" in command
  remote = shlex.split(command[command.index("--command") + 1])
  assert remote[remote.index("&&") + 1:] == [
      "KDJAX_DISTRIBUTED=auto", "./kd", "run", "--workdir=gs://bucket/run",
      "--config=configs/default.py", "--config.arms=kd,rcd"]
