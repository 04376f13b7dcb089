"""Section `capacity`: dark knowledge under teachers of several capacities (Fan, Li and Zhan,
arXiv 2405.13078).

On the eval split, with labels y, C classes and p = softmax(t) of a teacher's logits t (T = 1):

  capacity            the teacher model's trainable parameter count (`kdjax.models.num_params`);
  accuracy            mean[argmax t = y] (the core analysis's teacher accuracy);
  nontarget_variance  mean over examples of v(x) = 1/(C-1) sum_{k != y} (p_k - mu)^2,
                      mu = 1/(C-1) sum_{k != y} p_k: the variance of the non-target
                      probabilities, target removed, not renormalised
                      (`kdjax.metrics.nontarget_variance`; the paper's "distinction among
                      non-ground-truth classes", observed to fall as capacity grows);
  rank consistency    for every pair of teacher models (A, B), per example over the C - 1
                      non-target classes (`kdjax.metrics.class_rank_consistency`): Spearman's rho,
                      Kendall's tau-b and the top-k rank-set overlap |top-k(A) & top-k(B)| / k,
                      each averaged over the eval split (examples where a ranking is constant,
                      where rho/tau are undefined, are left out of that mean) and over the
                      teacher replicas of A x B; the paper's second observation is that these stay
                      high (Spearman mostly > 0.85 on CIFAR-100) across capacities;
  student accuracy    per arm x teacher model: mean ± sample std over the arm's included
                      students (diverged ones left out) of their eval accuracy; arms without a
                      teacher have one row ("-").

Teachers of one model (several seeds) are averaged; diverged teachers are left out. Plots:
`capacity_variance.png` (non-target variance against capacity, log x) and
`capacity_students.png` (student accuracy against teacher capacity per arm, no-teacher arms as
horizontal lines).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from kdjax import metrics as metrics_lib
from kdjax import models as models_lib
from kdjax import stats
from kdjax.analysis import plots
from kdjax.analysis import sections

TOP_K = 5  # the rank-set size (clipped to C - 1)
RANK_METRICS = ("spearman", "kendall", "topk_overlap")
_CHUNK = 1000  # examples per class_rank_consistency call (its memory is O(C^2) per example)


def teacher_capacities(study) -> dict[str, int]:
  """{teacher model label: trainable parameter count}, from abstract evaluation only."""
  spec = study.dataset
  x = spec.example_input()
  return {g.model.label: models_lib.num_params(g.model.module(spec.num_classes), x)
          for g in study.teacher.groups}


def mean_nontarget_variance(logits: np.ndarray, labels: np.ndarray) -> float:
  """Eval-split mean of `kdjax.metrics.nontarget_variance` (float64 mean of the per-example
  values)."""
  values = np.asarray(metrics_lib.nontarget_variance(jnp.asarray(logits), jnp.asarray(labels)))
  return float(np.mean(values, dtype=np.float64))


_rank_consistency = jax.jit(metrics_lib.class_rank_consistency, static_argnames=("k",))


def rank_consistency(a_logits: np.ndarray, b_logits: np.ndarray, labels: np.ndarray,
                     k: int) -> dict[str, float]:
  """Eval-split means of `kdjax.metrics.class_rank_consistency` (NaN entries left out)."""
  parts = {m: [] for m in RANK_METRICS}
  for start in range(0, len(labels), _CHUNK):
    out = _rank_consistency(jnp.asarray(a_logits[start:start + _CHUNK]),
                            jnp.asarray(b_logits[start:start + _CHUNK]),
                            jnp.asarray(labels[start:start + _CHUNK]), k=k)
    for m in RANK_METRICS:
      parts[m].append(np.asarray(out[m], np.float64))
  result = {}
  for m in RANK_METRICS:
    values = np.concatenate(parts[m])
    values = values[np.isfinite(values)]
    result[m] = float(values.mean()) if values.size else math.nan
  return result


def _summary(values) -> dict:
  mean, std = stats.mean_std(values)
  return {"mean": float(mean), "std": float(std), "n": len(values)}


def capacity_table(study, preds, included: set[int], teacher_diverged) -> dict:
  """The section's results (see the module docstring)."""
  labels = np.asarray(preds.labels)
  num_classes = preds.teacher_logits.shape[-1]
  k = min(TOP_K, num_classes - 1)
  capacities = teacher_capacities(study)
  teacher_diverged = np.asarray(teacher_diverged, bool)
  by_model: dict[str, list[int]] = {}
  for t in study.teacher.replicas:
    if not teacher_diverged[t.index]:
      by_model.setdefault(t.model, []).append(t.index)
  models = sorted(by_model, key=lambda m: (capacities[m], m))
  teachers = []
  for m in models:
    members = by_model[m]
    teachers.append({
        "model": m, "num_params": capacities[m], "n": len(members),
        "accuracy": float(np.mean([preds.teacher_metrics[j]["accuracy"] for j in members])),
        "nontarget_variance": float(np.mean([
            mean_nontarget_variance(preds.teacher_logits[j], labels) for j in members]))})
  pairs = []
  for a, b in itertools.combinations(models, 2):
    per_pair = [rank_consistency(preds.teacher_logits[i], preds.teacher_logits[j], labels, k)
                for i in by_model[a] for j in by_model[b]]
    pairs.append({"a": a, "b": b,
                  **{m: float(np.nanmean([p[m] for p in per_pair])) for m in RANK_METRICS}})
  students: dict[str, dict[str, dict]] = {}
  for r in study.students.replicas:
    if r.index in included:
      students.setdefault(r.arm, {}).setdefault(r.teacher_model or "-", []).append(
          preds.student_metrics[r.index]["accuracy"])
  students = {arm: {m: _summary(v) for m, v in sorted(
      rows.items(), key=lambda kv: (capacities.get(kv[0], -1), kv[0]))}
              for arm, rows in students.items()}
  return {"k": k, "teachers": teachers, "rank_consistency": pairs,
          "student_accuracy": students}


def _plot_variance(path: str, table: dict) -> None:
  fig = Figure(figsize=(4.6, 3.6))
  ax = fig.subplots()
  x = [t["num_params"] for t in table["teachers"]]
  ax.plot(x, [t["nontarget_variance"] for t in table["teachers"]], "o-")
  for t in table["teachers"]:
    ax.annotate(t["model"], (t["num_params"], t["nontarget_variance"]), fontsize=6)
  ax.set_xscale("log")
  ax.set_xlabel("teacher parameters")
  ax.set_ylabel("mean non-target variance")
  ax.set_title("non-target variance vs capacity")
  fig.tight_layout()
  plots._save(fig, path)  # pylint: disable=protected-access


def _plot_students(path: str, table: dict) -> None:
  capacity = {t["model"]: t["num_params"] for t in table["teachers"]}
  fig = Figure(figsize=(5.2, 3.8))
  ax = fig.subplots()
  for i, (arm, rows) in enumerate(table["student_accuracy"].items()):
    color = f"C{i % 10}"
    points = [(capacity[m], v["mean"], v["std"]) for m, v in rows.items() if m in capacity]
    if points:
      xs, ys, es = zip(*points)
      ax.errorbar(xs, ys, yerr=[0.0 if math.isnan(e) else e for e in es], fmt="o-",
                  color=color, label=arm, capsize=2)
    elif "-" in rows:  # an arm without a teacher: one level for all capacities
      ax.axhline(rows["-"]["mean"], color=color, linestyle="--", label=arm)
  ax.set_xscale("log")
  ax.set_xlabel("teacher parameters")
  ax.set_ylabel("student eval accuracy")
  ax.set_title("students vs teacher capacity")
  ax.legend(fontsize=7)
  fig.tight_layout()
  plots._save(fig, path)  # pylint: disable=protected-access


def _fmt(value: float, spec: str = ".4f") -> str:
  return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


@sections.register("capacity")
def capacity(context: sections.Context) -> sections.Section:
  included = {i for g in context.groups for i in g.included}
  table = capacity_table(context.study, context.preds, included, context.teacher_diverged)
  _plot_variance(f"{context.plot_dir}/capacity_variance.png", table)
  _plot_students(f"{context.plot_dir}/capacity_students.png", table)
  lines = ["## Teacher capacity and dark knowledge", "",
           "Teachers of several capacities (arXiv 2405.13078): larger teachers are expected to "
           "have less distinct non-target probabilities (lower non-target variance) while ranking "
           "the non-target classes alike.", "",
           "| teacher | parameters | accuracy | mean non-target variance | n |",
           "|---|---|---|---|---|"]
  for t in table["teachers"]:
    lines.append(f"| {t['model']} | {t['num_params']:,} | {_fmt(t['accuracy'])} | "
                 f"{_fmt(t['nontarget_variance'], '.3e')} | {t['n']} |")
  if table["rank_consistency"]:
    lines += ["", f"Class-rank consistency between teacher models over the non-target classes "
              f"(per example, then averaged; top-{table['k']} overlap):", "",
              "| teacher A | teacher B | Spearman | Kendall | top-k overlap |",
              "|---|---|---|---|---|"]
    for p in table["rank_consistency"]:
      lines.append(f"| {p['a']} | {p['b']} | {_fmt(p['spearman'])} | {_fmt(p['kendall'])} | "
                   f"{_fmt(p['topk_overlap'])} |")
  models = [t["model"] for t in table["teachers"]]
  lines += ["", "Student accuracy (mean ± std over seeds) per arm and teacher model:", "",
            "| arm | " + " | ".join(models + ["no teacher"]) + " |",
            "|---|" + "---|" * (len(models) + 1)]
  for arm, rows in table["student_accuracy"].items():
    cells = []
    for m in models + ["-"]:
      v = rows.get(m)
      cells.append("" if v is None else f"{_fmt(v['mean'])} ± {_fmt(v['std'])} (n={v['n']})")
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  lines += ["", "![non-target variance vs capacity](plots/capacity_variance.png)", "",
            "![students vs teacher capacity](plots/capacity_students.png)"]
  return sections.Section(results=table, markdown="\n".join(lines))
