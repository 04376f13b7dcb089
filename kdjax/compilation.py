"""How kdjax compiles: XLA:CPU's optimisation level, and JAX's persistent compilation cache.

Compiling the training and inference programs is most of what a small study costs on CPU.

**Optimisation level** (`jit`). XLA:CPU compiles with LLVM at -O3 by default. kdjax's programs
compile at `xla_backend_optimization_level` CPU_OPTIMIZATION_LEVEL instead: measured on 2 cores,
the default cnn's model init (unrolled threefry draws) compiles in 0.5 s instead of 2.6 s and a
training block in about 40% less time, steps run as fast, and every result is bitwise the same
(tests/test_compilation.py checks a training run against -O3). Level 0 is not used: it changes
float results (no FMA contraction). Other backends compile with their defaults.

**Persistent cache** (`enable_persistent_cache`), on by default for `python -m kdjax.main` and
the tests.

With the cache, a rerun, a resume, `--config.stages=analysis` or a second test run reads each
compiled program from disk instead of compiling it again. The cache is JAX's own
(`jax_compilation_cache_dir`): entries are keyed by the program, the compile options, the jax
and jaxlib versions and the device kind, so a cached program is the program XLA would compile,
and results are bitwise those of an uncached run (tests/test_compilation.py checks it).

Where it is, from the environment:
  KDJAX_COMPILATION_CACHE=off (or 0, false, no)  no persistent cache;
  KDJAX_COMPILATION_CACHE=DIR                    the cache in DIR;
  unset: JAX_COMPILATION_CACHE_DIR if set (JAX's own variable), else
         $XDG_CACHE_HOME/kdjax/jax (default ~/.cache/kdjax/jax).
The cache grows with every new program shape; delete the directory to reclaim the space.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

OFF = ("off", "0", "false", "no")
CPU_OPTIMIZATION_LEVEL = 1


def compiler_options() -> dict[str, Any] | None:
  """XLA compile options of kdjax's programs on the default backend (None: XLA's defaults)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    return None
  return {"xla_backend_optimization_level": CPU_OPTIMIZATION_LEVEL}


def jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit(fun, **kwargs)`, compiled with `compiler_options()` when called at top level.

  The backend is read at the first call, so module-level programs may use it before JAX starts
  (kdjax.distributed must initialise first). Inside another trace (`jax.eval_shape`, an outer
  jit) XLA compile options do not apply and the plain `jax.jit` is called."""
  import jax  # pylint: disable=g-import-not-at-top
  plain = jax.jit(fun, **kwargs)
  compiled = []

  @functools.wraps(fun)
  def call(*args, **kw):
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kw))):
      return plain(*args, **kw)
    if not compiled:
      compiled.append(jax.jit(fun, compiler_options=compiler_options(), **kwargs))
    return compiled[0](*args, **kw)

  return call


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


def enable_persistent_cache(environ=None) -> str | None:
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
