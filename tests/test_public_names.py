"""The public libraries declare `__all__`: exactly their own public functions and classes."""

from __future__ import annotations

import types

import pytest

from kdjax import losses, metrics, stats


def _public_callables(module) -> set[str]:
  """Callables defined in `module` (not imported into it) whose names have no leading '_'."""
  return {name for name in dir(module) if not name.startswith("_")
          and callable(getattr(module, name))
          and getattr(getattr(module, name), "__module__", None) == module.__name__}


@pytest.mark.parametrize("module", [losses, metrics, stats], ids=lambda m: m.__name__)
def test_all_lists_exactly_the_public_functions_and_classes(module):
  assert len(module.__all__) == len(set(module.__all__)), "duplicate names in __all__"
  assert set(module.__all__) == _public_callables(module)
  for name in module.__all__:
    assert not isinstance(getattr(module, name), types.ModuleType), name
  # what `import *` used to leak
  assert not {"jax", "jnp", "np", "optax", "annotations", "flax", "math", "scipy"} & \
      set(module.__all__)


@pytest.mark.parametrize("module", [losses, metrics], ids=lambda m: m.__name__)
def test_public_functions_document_args_and_returns(module):
  """optax-style docstrings: every public function of the losses and metrics has both sections."""
  import inspect
  for name in module.__all__:
    obj = getattr(module, name)
    if inspect.isfunction(obj):
      doc = inspect.getdoc(obj) or ""
      assert "\nArgs:\n" in doc and "\nReturns:\n" in doc, f"{module.__name__}.{name}"
