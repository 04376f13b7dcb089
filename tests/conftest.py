"""Suite-wide setting: JAX's persistent compilation cache, as `./kd run` uses it
(kdjax/compilation.py: the per-user directory, or KDJAX_COMPILATION_CACHE; `off` disables it).
The `python -m kdjax.main` subprocesses of the tests turn it on themselves; this turns it on for
the tests' own processes, so a second run of the suite reads most programs instead of compiling
them. A cached program is bitwise the program XLA compiles (tests/test_compilation.py)."""

from kdjax import compilation

compilation.enable_persistent_cache()
