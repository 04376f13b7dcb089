"""JAX's persistent compilation cache, on by default for `python -m kdjax.main` and the tests.

Compiling the training and inference programs is most of what a small study costs on CPU. With
the cache, a rerun, a resume, `--config.stages=analysis` or a second test run reads each
compiled program from disk instead of compiling it again. The cache is JAX's own
(`jax_compilation_cache_dir`): entries are keyed by the program, the compile options, the jax
and jaxlib versions and the device kind, so a cached program is the program XLA would compile,
and results are bitwise those of an uncached run (tests/test_compile_cache.py checks it).

Where it is, from the environment:
  KDJAX_COMPILATION_CACHE=off (or 0, false, no)  no persistent cache;
  KDJAX_COMPILATION_CACHE=DIR                    the cache in DIR;
  unset: JAX_COMPILATION_CACHE_DIR if set (JAX's own variable), else
         $XDG_CACHE_HOME/kdjax/jax (default ~/.cache/kdjax/jax).
The cache grows with every new program shape; delete the directory to reclaim the space.
"""

from __future__ import annotations

import os

OFF = ("off", "0", "false", "no")


def directory(environ=None) -> str | None:
  """The cache directory the environment asks for, or None when it is off."""
  environ = os.environ if environ is None else environ
  setting = environ.get("KDJAX_COMPILATION_CACHE", "").strip()
  if setting.lower() in OFF:
    return None
  if setting:
    return os.path.expanduser(setting)
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "kdjax", "jax")


def enable(environ=None) -> str | None:
  """Turns the persistent cache on for this process (before its first compilation), for every
  program however quick to compile (JAX's default skips those under a second, most of a small
  study's). Returns the directory, or None when the environment turns it off."""
  import jax  # pylint: disable=g-import-not-at-top  (callers import this module before JAX)
  path = directory(environ)
  if path is None:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # JAX reads these settings when it first compiles; a process that compiled before starts over.
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.reset_cache()
  return path
