"""The layering: validating a config loads neither the analysis stage nor the engine, and the
analysis sections' name table (what validation reads) matches the sections' registrations."""

from __future__ import annotations

import importlib
import subprocess
import sys

import _cli


def test_validating_a_config_with_analyses_loads_no_analysis_module():
  """`kdjax.study.resolve` of a config listing analysis sections imports no section module, no
  matplotlib, no engine or training loop (the import circle study -> analysis is gone)."""
  code = (
      "import sys\n"
      "from kdjax import study\n"
      "config = study.load_config('configs/default.py')\n"
      "config.analyses = 'deviation,kd_switch,width_scaling'\n"
      "s = study.resolve(config)\n"
      "assert s.analyses == ('deviation', 'kd_switch', 'width_scaling'), s.analyses\n"
      "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'kdjax.engine', "
      "'kdjax.train', 'kdjax.analysis.'))))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=_cli.ROOT, env=_cli.env(1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "['kdjax.analysis.sections']"


def test_the_section_table_names_each_registered_section_and_its_module():
  from kdjax.analysis import sections
  for module in set(sections.MODULES.values()):
    importlib.import_module(module)
  assert set(sections.SECTIONS) == set(sections.MODULES)
  for name, fn in sections.SECTIONS.items():
    assert fn.__module__ == sections.MODULES[name], name
    assert sections.get(name) is fn
