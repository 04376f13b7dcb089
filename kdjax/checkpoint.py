"""Orbax checkpoints of a stage: WORKDIR/<stage>/checkpoints, resumable, replicas named.

Each checkpoint step holds two items:
  state     the full TrainState (params, optimiser state, batch statistics, step, PRNG keys);
            with the step they fix the data position, so a restored run continues exactly;
  replicas  JSON metadata naming every replica (arm, seed, teacher, alpha, temperature, ...)
            and the stage it belongs to.
The same metadata is written beside the checkpoints as `replicas.json` for people and tools.

A step is written under a temporary name and renamed to its bare number when complete (Orbax),
so a run killed while saving leaves no step behind, only a temporary directory. A complete step
whose files were damaged afterwards (a truncated or overwritten file) is found when it is
restored: `restore_latest` then falls back to the newest step that can be read, with a warning,
and sets the damaged steps aside as `<step>.unreadable-<time>` so training can write them
again. When steps exist and none can be read it raises `UnreadableCheckpointError` instead of
starting over.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

import orbax.checkpoint as ocp
from absl import logging

from kdjax import distributed
from kdjax import workdir as workdir_lib
from kdjax.replicas import Replica


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint step (or every step of a directory) that cannot be restored."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint that could not be written (a full disk, a lost mount): one line naming the
  directory and the cause. The steps written before are untouched."""


def replica_metadata(stage: str, replicas: Sequence[Replica], **extra) -> dict[str, Any]:
  """{"stage", "replicas": [row per replica: its identity and "diverged"], **extra}."""
  return {"stage": stage, "replicas": [{**r.to_json(), "diverged": False} for r in replicas],
          **extra}


def finished_steps(directory: str) -> list[int]:
  """The complete steps in `directory`, ascending, as Orbax lists them: temporary directories
  of unfinished saves and set-aside unreadable steps are not steps."""
  if not workdir_lib.is_dir(directory):
    return []
  return sorted(ocp.path.step.checkpoint_steps(directory))


def latest_finished_step(directory: str) -> int | None:
  """The newest complete step in `directory` (None if there is none), without opening a
  manager: the step `StageCheckpoints.restore_latest` tries first."""
  steps = finished_steps(directory)
  return steps[-1] if steps else None


def _cause(error: BaseException) -> str:
  """The innermost error's first line, shortened: TensorStore wraps the useful message
  ("OUT_OF_RANGE: Error reading ...") in an error that carries a whole spec dump."""
  seen = {id(error)}
  while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
    error = inner
    seen.add(id(error))
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  first = lines[0] if lines else ""
  return f"{type(error).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"


def _drop_closed_loop_callbacks() -> None:
  """After a restore fails, TensorStore still completes the reads that were in flight and hands
  each result to the asyncio loop Orbax has closed meanwhile; every one would print a
  "RuntimeError: Event loop is closed" traceback (through sys.unraisablehook) around the one
  warning that matters, and a read coroutine discarded with its error still pending prints that
  error again ("Encountered error while reading array index", the failure the restore already
  reported). Drops exactly those; installed once, on the first failed restore."""
  if getattr(sys.unraisablehook, "kdjax", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    exc = unraisable.exc_value
    closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    echo = str(exc).startswith("Encountered error while reading array index")
    if not (closed_loop or echo):
      previous(unraisable)

  hook.kdjax = True
  sys.unraisablehook = hook


class StageCheckpoints:
  """A CheckpointManager for one stage's directory."""

  def __init__(self, directory: str, *, save_every_steps: int | None = None,
               keep: int | None = None, read_only: bool = False):
    self.directory = workdir_lib.absolute(directory)  # a local path or gs://...
    self.read_only = read_only
    if read_only:
      # Not orbax's read_only mode, which logs a warning on every open; this manager only reads.
      options = ocp.CheckpointManagerOptions(create=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             save_interval_steps=save_every_steps or 1)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "replicas"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, metadata: dict[str, Any], *, force: bool = False) -> bool:
    """Saves asynchronously; False if skipped (not a save step, or `step` is already saved,
    e.g. a stop request at a step the interval has just saved)."""
    if force and step in self.manager.all_steps():
      return False
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), replicas=ocp.args.JsonSave(metadata)), force=force)
      if saved:
        workdir_lib.write_text(workdir_lib.join(workdir_lib.parent(self.directory),
                                                "replicas.json"), json.dumps(metadata, indent=1))
    except Exception as e:  # pylint: disable=broad-except  (OSError, or Orbax's wrapping of one)
      raise self._write_error(f"step {step}", e) from e
    return saved

  def _write_error(self, what: str, error: BaseException) -> CheckpointWriteError:
    """Also for an asynchronous save that fails later (reported by the next save or `wait`)."""
    try:
      self.manager.wait_until_finished()  # an earlier save still in flight completes first
    except Exception:  # pylint: disable=broad-except  (it is the failure being reported)
      pass
    try:
      previous = latest_finished_step(self.directory)  # as on disk
    except Exception:  # pylint: disable=broad-except  (the directory itself is gone)
      previous = None
    kept = ("no earlier checkpoint" if previous is None else
            f"the checkpoint of step {previous} is kept")
    return CheckpointWriteError(
        f"cannot write checkpoint {what} in {self.directory} ({_cause(error)}); {kept}; free "
        "space and rerun the same command to resume")

  def restore(self, abstract_state, step: int | None = None):
    """(state, metadata) at exactly `step`; `step=None`: the newest readable step
    (`restore_latest`). `abstract_state` gives shapes/shardings. Raises
    UnreadableCheckpointError if the step's files cannot be read."""
    if step is None:
      _, state, metadata = self.restore_latest(abstract_state)
      return state, metadata
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), replicas=ocp.args.JsonRestore()))
    # Damaged files surface as TensorStore's bare Exception, ValueError (missing or garbled
    # metadata, a tree that no longer matches), KeyError (a missing item) or JSONDecodeError.
    except Exception as e:  # pylint: disable=broad-except
      _drop_closed_loop_callbacks()
      raise UnreadableCheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be read ({_cause(e)}); rerunning "
          "the stage that wrote it resumes from its previous readable step") from e
    return restored.state, restored.replicas

  def restore_latest(self, abstract_state):
    """(step, state, metadata) of the newest step that can be read.

    Newer steps that cannot be read are skipped with an absl WARNING naming them and the step
    used; a writable manager sets them aside (renamed `<step>.unreadable-<time>`, not deleted)
    so that training can save those steps again. Raises FileNotFoundError if the directory has
    no step, UnreadableCheckpointError if it has steps and none can be read.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for step in steps:
      try:
        state, metadata = self.restore(abstract_state, step)
      except UnreadableCheckpointError as e:
        failures.append((step, e))
        continue
      if failures:
        self._skip_unreadable(failures, step)
      return step, state, metadata
    raise UnreadableCheckpointError(
        f"no checkpoint in {self.directory} can be read (steps "
        f"{', '.join(str(s) for s, _ in failures)}; newest: {_cause(failures[0][1].__cause__)}); "
        "kdjax does not start a stage over while checkpoints exist: move the directory away to "
        "train the stage from the start")

  def _skip_unreadable(self, failures, used: int) -> None:
    bad = ", ".join(str(s) for s, _ in failures)
    aside = ""
    if not self.read_only:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      names = [f"{step}.unreadable-{stamp}" for step, _ in failures]
      if distributed.is_primary():  # several processes share the directory; one renames
        for (step, _), name in zip(failures, names):
          workdir_lib.rename(workdir_lib.join(self.directory, str(step)),
                             workdir_lib.join(self.directory, name))
      distributed.barrier("kdjax: unreadable checkpoints set aside")
      self.manager.reload()  # its cached step list still holds the renamed steps
      aside = f"; set aside as {', '.join(names)}"
    logging.warning("checkpoint step %s in %s cannot be read (%s); restored step %d instead%s",
                    bad, self.directory, _cause(failures[0][1].__cause__), used, aside)

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (a failed asynchronous save)
      raise self._write_error("(an asynchronous save)", e) from e

  def close(self) -> None:
    self.manager.close()
