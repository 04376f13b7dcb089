"""configs/selfdistill_controls.py (arXiv 2510.12615) and its `width_scaling` section.

The section's numbers are recomputed here from predictions.npz with numpy (agreement split by
teacher correctness, per student) and scipy.stats.linregress (slopes against log2 width)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kdjax import study as study_lib
from kdjax.analysis import width as width_lib
# A persistent compilation cache for the module: the study's groups share their equal programs.
from test_engine import compilation_cache  # noqa: F401  (its module-scoped autouse fixture)
from test_groups import config_from_flags, run_in_process

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "selfdistill_controls.py"


def test_ols_slope_is_the_closed_form_least_squares_fit():
  """width.ols_slope (scipy.stats.linregress) against slope = Sxy / Sxx and its standard error
  sqrt(SSE / (n - 2) / Sxx), the numbers the section reported before it used linregress."""
  rng = np.random.default_rng(0)
  x = np.log2(np.repeat([0.125, 0.25, 0.5, 1.0], 5))
  y = 0.3 + 0.05 * x + rng.normal(0, 0.02, x.size)
  xc = x - x.mean()
  slope = np.sum(xc * (y - y.mean())) / np.sum(xc**2)
  stderr = np.sqrt(np.sum((y - y.mean() - slope * xc)**2) / (x.size - 2) / np.sum(xc**2))
  got = width_lib.ols_slope(x, y)
  assert got[0] == pytest.approx(slope, rel=1e-12)
  assert got[1] == pytest.approx(stderr, rel=1e-10)
  assert width_lib.ols_slope(np.append(x, 3.0), np.append(y, np.nan)) == got  # NaN point dropped
  assert np.isnan(width_lib.ols_slope(np.ones(4), y[:4])).all()  # one width: no slope
  two = width_lib.ols_slope(x[[0, 5]], y[[0, 5]])  # two points: a slope, no standard error
  assert two[0] == pytest.approx((y[5] - y[0]) / (x[5] - x[0]), rel=1e-12) and np.isnan(two[1])


@pytest.mark.parametrize("arg", ["smoke", "smoke,width", "smoke,heavy_aug", "smoke,temperature",
                                 "smoke,features"])
def test_every_smoke_variant_resolves(arg):
  study = study_lib.resolve(study_lib.load_config(str(CONFIG), arg))
  arms = {r.arm for r in study.students.replicas}
  if arg == "smoke,width":
    assert len(study.students.groups) == 3 and arms == {"kd", "rcd", "onehot"}
    assert study.analyses == ("width_scaling",)
  elif arg == "smoke,heavy_aug":
    assert {r.teacher_augment for r in study.students.replicas if r.arm == "kd"} == {
        "none", "strong"}
  elif arg == "smoke,features":
    assert "feature_hint" in arms
  else:
    assert arms == {"kd", "rcd", "siddo"}


@pytest.mark.parametrize("arg", ["mnist1d", "mnist1d,width", "mnist1d,temperature"])
def test_mnist1d_study_resolves_offline(arg):
  """MNIST-1D: the paper's MLP (hidden 100, 100) on 40-sample vectors, 20 seeds per arm (at least
  9 pairs for a Holm-corrected Wilcoxon verdict over 10 metrics: 2 / 2^9 x 10 < 0.05)."""
  study = study_lib.resolve(study_lib.load_config(str(CONFIG), arg))
  assert study.dataset.name == "mnist1d" and study.dataset.input_shape == (40,)
  assert study.num_train == 4000 and study.num_eval == 1000
  assert all(dict(g.model.kwargs).get("hidden") == (100, 100) for g in study.teacher.groups)
  if arg == "mnist1d":
    assert {r.arm for r in study.students.replicas} == {"kd", "rcd", "siddo"}
    assert len(study.students.replicas) == 3 * 20 and 2 / 2 ** 20 * 10 < 0.05


def test_sequence_model_kwargs_survive_the_config_json_round_trip():
  """config.json turns mlp's hidden=(100, 100) into a list; the analysis resolves it from there
  and must find the same models (hashable specs, the same labels) as the training did."""
  import json
  import ml_collections
  config = study_lib.load_config(str(CONFIG), "mnist1d")
  reloaded = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  assert reloaded.model_kwargs.hidden == [100, 100]
  before, after = study_lib.resolve(config), study_lib.resolve(reloaded)
  assert [g.model for g in after.students.groups] == [g.model for g in before.students.groups]
  assert after.students.groups[0].model.label == "mlp(hidden=(100, 100))"


@pytest.mark.parametrize("arg", ["cifar100", "smoke,depth", "tiny_shakespeare,heavy_aug",
                                 "mnist1d,heavy_aug"])
def test_bad_arguments_name_what_is_allowed(arg):
  with pytest.raises(ValueError, match="DATASET|image data"):
    study_lib.load_config(str(CONFIG), arg)


@pytest.fixture(scope="module")
def width_run(tmp_path_factory):
  """The width variant at below-smoke size: MLPs of widths 0.05/0.1/0.2, 2 seeds, 1 epoch, run in
  this process (tests/test_groups.py, `run_in_process`). Compiling dominates the run: vmapped
  replicas (no convolutions, so vmap is not slow on XLA:CPU) compile one step per width instead
  of one per replica (about a third of the unrolled default's CPU time); the section does not
  depend on it."""
  workdir = tmp_path_factory.mktemp("sd_width") / "wd"
  config = config_from_flags(
      ["--config.model=mlp", "--config.teacher_model=mlp", "--config.model_kwargs.width=0.1",
       "--config.teacher_model_kwargs.width=0.1", "--config.model_grid.width=0.05,0.1,0.2",
       "--config.num_seeds=2", "--config.num_epochs=1", "--config.batch_size=100",
       "--config.execution=vmap"],
      config=f"--config={CONFIG}:smoke,width")
  run_in_process(config, workdir)
  return workdir


def test_width_section_equals_a_numpy_recomputation(width_run):
  results = json.loads((width_run / "analysis" / "metrics.json").read_text())
  table = results["analyses"]["width_scaling"]
  preds = np.load(width_run / "analysis" / "predictions.npz")
  labels = preds["labels"]
  teacher_pred = np.argmax(preds["teacher_logits"], -1)
  student_pred = np.argmax(preds["student_logits"], -1)
  widths = np.array([float(m.split("width=")[1].rstrip(")")) for m in preds["replica_model"]])
  assert set(table) == {"kd", "rcd", "onehot"}
  for arm, entry in table.items():
    rows = np.flatnonzero(preds["replica_arm"] == arm)
    assert entry["widths"] == [0.05, 0.1, 0.2]
    for metric, teacher_right in (("agree_when_teacher_correct", True),
                                  ("agree_when_teacher_incorrect", False)):
      per_student = []
      for r in rows:
        t = teacher_pred[preds["replica_teacher"][r]]
        on = (t == labels) == teacher_right
        per_student.append(np.mean(student_pred[r][on] == t[on]))
      per_student = np.array(per_student)
      for k, w in enumerate(entry["widths"]):
        expected = per_student[widths[rows] == w].mean()
        assert entry[metric]["mean"][k] == pytest.approx(expected, abs=1e-6), (arm, metric, w)
      fit = scipy_stats.linregress(np.log2(widths[rows]), per_student)
      assert entry[metric]["slope_per_doubling"] == pytest.approx(fit.slope, abs=1e-6)
  assert (width_run / "analysis" / "plots" / "width_scaling.png").stat().st_size > 10_000
  assert "## Width scaling" in (width_run / "analysis" / "report.md").read_text()
