"""Loading a study config file, `--config=PATH[:ARG]`: a Python file whose `get_config(arg)`
returns an `ml_collections.ConfigDict`.

`load` raises `ConfigFileError` with one line naming the file and what is wrong (missing, not
importable: a syntax error or an exception at import, no `get_config`, an exception in it, a
result that is not a ConfigDict). It imports neither JAX nor TensorFlow, so kdjax.main refuses a
bad config file before paying for them.

A config file's helpers (configs/*.py), as big_vision's `parse_arg`:

  dataset, variant = configfile.parse_arg(arg, "configs/x.py", "smoke", dataset=DATASETS,
                                          variant=("", "strong_student"))
  config = configfile.base_config(__file__)   # configs/default.py's get_config(), to modify
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import ml_collections

USAGE = "a config file is a Python file defining get_config(arg=None) that returns an " \
        "ml_collections.ConfigDict (copy configs/default.py)"


class ConfigFileError(ValueError):
  """A config file that cannot give a config; the message is one line starting '--config: '."""

  def __init__(self, message: str):
    super().__init__(f"--config: {message}")


def _cause(error: BaseException) -> str:
  """The error on one line: its type and its message's lines joined."""
  text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load(path: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of the config file `path` (args: () or (ARG,), as after the colon)."""
  if not path:
    raise ConfigFileError(f"no file given; {USAGE}")
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise ConfigFileError(f"{path} {what}; {USAGE}")
  name = "kdjax_config_" + os.path.splitext(os.path.basename(path))[0]
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
      raise ImportError("not a Python source file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigFileError(f"{path}, line {e.lineno}: SyntaxError: {e.msg}; {USAGE}") from None
  except Exception as e:  # pylint: disable=broad-except  (whatever the user's file raises)
    raise ConfigFileError(f"importing {path} failed ({_cause(e)}); {USAGE}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigFileError(f"{path} defines no get_config(); {USAGE}")
  call = f"get_config({', '.join(repr(a) for a in args)})"
  try:
    config = get_config(*args)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigFileError(f"{call} of {path} failed ({_cause(e)})") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(f"{call} of {path} returned {type(config).__name__}, not an "
                          f"ml_collections.ConfigDict; {USAGE}")
  return config


def load_flag(value: str) -> ml_collections.ConfigDict:
  """The config of a `--config` value, PATH or PATH:ARG (ARG is passed to get_config)."""
  return load(*value.split(":", 1))




def base_config(file: str, name: str = "default.py") -> ml_collections.ConfigDict:
  """`get_config()` of the config file `name` in the directory of `file` (a config file's
  `__file__`): the study a config file starts from and changes."""
  return load(os.path.join(os.path.dirname(os.path.abspath(file)), name))


def parse_arg(arg: str | None, file: str, default: str,
              **fields: Sequence[str]) -> tuple[str, ...]:
  """The values of a config file's comma-separated ARG (`--config=PATH:ARG`), one per keyword of
  `fields` in order: `arg`, or `default` when it is empty or None, split at commas, missing
  trailing values ''. Each value must be one of its field's choices ('' among them makes the
  field optional). ValueError otherwise, naming `file`, the form (e.g. DATASET[,VARIANT]) and
  every field's choices."""
  values = (arg or default).split(",")
  values += [""] * (len(fields) - len(values))
  if len(values) == len(fields) and all(v in c for v, c in zip(values, fields.values())):
    return tuple(values)
  names = [name.upper() for name in fields]
  form = names[0] + "".join(f"[,{n}]" if "" in c else f",{n}"
                            for n, c in zip(names[1:], list(fields.values())[1:]))
  choices = " and ".join(f"{n} one of {', '.join(v for v in c if v)}"
                         for n, c in zip(names, fields.values()))
  raise ValueError(f"{file} takes {form} with {choices}; got {arg!r}")
