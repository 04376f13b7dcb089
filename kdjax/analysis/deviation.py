"""Report sections on student-teacher deviations and loss switching (arXiv 2301.12923, Sec. 3).

Nagarajan et al., "On student-teacher deviations in distillation: does it pay to disobey?"
(arXiv 2301.12923) plot, for every point, the teacher's against the student's logit-transformed
probability of the true class (Fig. 1; kdjax draws it as plots/confidence_scatter.png) and find
that the student *underfits the points the teacher finds hard*: where the teacher's confidence is
low, the student's is lower still. They also switch the loss between one-hot and distillation
during training and find that switching to distillation late recovers most of its gain. Two
sections measure both:

  deviation  per group (arm and grid point) and per bucket of teacher confidence, the fraction of
             points on which the student's true-class probability is below its teacher's, and the
             mean log-odds gap; on the eval split (the logits of predictions.npz) and on the train
             split (the split the student was fitted on); plots/deviation.png
  kd_switch  the final eval accuracy of each KD window (`kd_windows`: one-hot -> KD at 25%, KD ->
             one-hot at 50%, ...), mean ± std over seeds, against the label-only arm and full KD;
             plots/kd_switch.png
"""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure
from scipy import special

from kdjax import arms as arms_lib
from kdjax import data as data_lib
from kdjax import stats
from kdjax.analysis import plots
from kdjax.analysis import sections

NUM_BUCKETS = 5
SPLITS = ("test", "train")


# ------------------------------------------------------------------------------------------------
# Pure measurements (numpy, float64).


def true_class_log_odds(logits, labels) -> np.ndarray:
  """The logit-transformed probability of the true class, computed without rounding p to 1:

    logit(p_y) = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j,   p = softmax(z),

  the axes of Fig. 1 of arXiv 2301.12923. float64, shape logits.shape[:-1]; finite for finite
  logits and C >= 2, so confident points of two models are still ordered (in float32 both
  probabilities would round to 1 and tie).
  """
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels)
  if z.shape[:-1] != y.shape or z.shape[-1] < 2:
    raise ValueError(f"labels must have shape logits.shape[:-1] and C >= 2; got logits "
                     f"{z.shape}, labels {y.shape}")
  true = np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
  others = np.where(np.arange(z.shape[-1]) == y[..., None], -np.inf, z)
  return true - special.logsumexp(others, axis=-1)


def confidence_buckets(teacher_log_odds, num_buckets: int = NUM_BUCKETS) -> np.ndarray:
  """Equal-count buckets of teacher confidence: bucket[n] = floor(rank[n] * B / N), where rank
  is the point's position when the N points are sorted by the teacher's true-class log-odds,
  ascending (ties in index order). Bucket 0 holds the points the teacher finds hardest."""
  t = np.asarray(teacher_log_odds).reshape(-1)
  if num_buckets < 1 or t.size < num_buckets:
    raise ValueError(f"num_buckets must be in [1, {t.size}] (the number of points), got "
                     f"{num_buckets}")
  ranks = np.empty(t.size, np.int64)
  ranks[np.argsort(t, kind="stable")] = np.arange(t.size)
  return ranks * num_buckets // t.size


def bucket_deviation(student_log_odds, teacher_log_odds, buckets,
                     num_buckets: int = NUM_BUCKETS) -> dict[str, np.ndarray]:
  """Per bucket b (`confidence_buckets`) of one student against its teacher:

    fraction_below[b] = mean over n in b of [logit p_s(n) < logit p_t(n)]   (strictly less
                        confident; equivalent to p_s < p_t since logit is increasing)
    log_odds_gap[b]   = mean over n in b of (logit p_s(n) - logit p_t(n))   (< 0: underfit)

  and the same over all points (`fraction_below_all`, `log_odds_gap_all`). NaN for an empty
  bucket."""
  s = np.asarray(student_log_odds, np.float64).reshape(-1)
  t = np.asarray(teacher_log_odds, np.float64).reshape(-1)
  b = np.asarray(buckets).reshape(-1)
  below, gap = (s < t).astype(np.float64), s - t
  count = np.bincount(b, minlength=num_buckets).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return {"fraction_below": np.bincount(b, below, num_buckets) / count,
            "log_odds_gap": np.bincount(b, gap, num_buckets) / count,
            "fraction_below_all": np.float64(below.mean()),
            "log_odds_gap_all": np.float64(gap.mean())}


# ------------------------------------------------------------------------------------------------
# Logits of a split.


def _flat(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[M, N, ..., C] logits and [N, ...] labels -> [M, P, C] and [P] (P = every label position)."""
  return logits.reshape(logits.shape[0], -1, logits.shape[-1]), labels.reshape(-1)


def split_log_odds(context: sections.Context, split: str):
  """(teacher [T, P], student [R, P]) true-class log-odds on `split`: the eval split from the
  collected predictions, the train split by running the final models (`context.teachers`,
  `context.students`) over it in fixed order (no augmentation), one batch at a time, so only
  [M, P] numbers are held."""
  if split == "test":
    labels = context.preds.labels
    t, y = _flat(context.preds.teacher_logits, labels)
    s, _ = _flat(context.preds.student_logits, labels)
    return (true_class_log_odds(t, np.broadcast_to(y, t.shape[:-1])),
            true_class_log_odds(s, np.broadcast_to(y, s.shape[:-1])))
  study = context.study
  device_arrays = data_lib.to_device(study.data[split], context.students.engines[0].replicated)
  teacher_parts, student_parts = [], []
  for batch in data_lib.eval_batches(device_arrays, study.dataset, study.run.eval_batch_size):
    valid = batch.num_valid
    y = np.asarray(batch.labels)[:valid]
    for models, parts in ((context.teachers, teacher_parts), (context.students, student_parts)):
      logits = np.asarray(models.logits(batch.x))[:, :valid]
      flat, flat_y = _flat(logits, y)
      parts.append(true_class_log_odds(flat, np.broadcast_to(flat_y, flat.shape[:-1])))
  return np.concatenate(teacher_parts, 1), np.concatenate(student_parts, 1)


# ------------------------------------------------------------------------------------------------
# deviation


def _window(context: sections.Context, group) -> str:
  return context.study.students.replicas[group.replicas[0]].kd_window


def measure_split(context: sections.Context, teacher_lo: np.ndarray, student_lo: np.ndarray,
                  num_buckets: int = NUM_BUCKETS) -> dict:
  """The `deviation` results of one split from its log-odds (see `deviation`)."""
  compared = context.preds.compared_teacher
  buckets = [confidence_buckets(t, num_buckets) for t in teacher_lo]
  teachers = []
  for j, (t, b) in enumerate(zip(teacher_lo, buckets)):
    p = special.expit(t)
    teachers.append({"index": j, "confidence_range": [
        [float(p[b == k].min()), float(p[b == k].max())] for k in range(num_buckets)]})
  per_replica, groups = {}, {}
  for g in context.groups:
    rows = []
    for r in g.included:
      j = int(compared[r])
      d = bucket_deviation(student_lo[r], teacher_lo[j], buckets[j], num_buckets)
      per_replica[r] = {"index": int(r), "group": g.name, "teacher": j,
                        **{k: np.asarray(v).tolist() for k, v in d.items()}}
      rows.append(d)
    if not rows:
      continue
    entry = {"n": len(rows)}
    for key in ("fraction_below", "log_odds_gap", "fraction_below_all", "log_odds_gap_all"):
      mean, std = stats.mean_std([d[key] for d in rows])
      entry[key] = {"mean": mean.tolist(), "std": std.tolist()}
    groups[g.name] = entry
  return {"teachers": teachers, "groups": groups,
          "replicas": [per_replica[r] for r in sorted(per_replica)]}


def _pct(mean, std) -> str:
  if mean is None or not np.isfinite(mean):
    return "n/a"
  text = f"{100 * mean:.0f}%"
  return text + (f" ± {100 * std:.0f}" if std is not None and np.isfinite(std) else "")


def _deviation_plot(path: str, context, results: dict, num_buckets: int) -> None:
  fig = Figure(figsize=(13, 4.4), layout="constrained")
  axes = fig.subplots(1, 2)
  x = np.arange(1, num_buckets + 1)
  for i, g in enumerate(g for g in context.groups if g.name in results["test"]["groups"]):
    for ax, key in zip(axes, ("fraction_below", "log_odds_gap")):
      for split, style in (("test", "-"), ("train", ":")):
        entry = results[split]["groups"].get(g.name)
        if entry is None:
          continue
        mean, std = np.array(entry[key]["mean"]), np.array(entry[key]["std"])
        ax.errorbar(x + 0.04 * (i - len(context.groups) / 2), mean,
                    yerr=np.where(np.isfinite(std), std, 0.0), color=plots._color(i),
                    ls=style, marker="o", ms=3, capsize=2,
                    label=f"{g.display} ({split})")
  axes[0].axhline(0.5, color="black", lw=1, ls="--")
  axes[0].set_ylim(0, 1)
  axes[0].set_ylabel("fraction of points with p_student < p_teacher")
  axes[1].axhline(0.0, color="black", lw=1, ls="--")
  axes[1].set_ylabel("mean logit p_student - logit p_teacher (true class)")
  for ax in axes:
    ax.set_xticks(x, [f"{k}\n{'hardest' if k == 1 else 'easiest' if k == num_buckets else ''}"
                      for k in x])
    ax.set_xlabel(f"bucket of teacher confidence (1 of {num_buckets} equal-count buckets)")
    ax.grid(alpha=0.3)
  handles, labels = axes[1].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="outside right upper")
  fig.suptitle("Student-teacher deviation by teacher confidence (arXiv 2301.12923, Fig. 1): "
               "mean ± std over seeds", fontsize=10)
  plots._save(fig, path)


@sections.register("deviation")
def deviation(context: sections.Context) -> sections.Section:
  """Does the student underfit the points its teacher finds hard (arXiv 2301.12923, Sec. 3)?

  For each split (eval: predictions.npz; train: the final models run over the train split)
  and each student r with teacher j: the points are split into NUM_BUCKETS equal-count buckets
  of teacher j's true-class confidence (`confidence_buckets`), and per bucket the fraction of
  points with p_s < p_t and the mean log-odds gap are measured (`bucket_deviation`); per group,
  mean and sample std over its included students. The paper's finding holds for a group when,
  in the lowest bucket, most points (> 50%) have the student below the teacher.
  """
  results = {"num_buckets": NUM_BUCKETS,
             "bucketing": "equal-count buckets of the teacher's true-class probability on the "
                          "split, bucket 1 = least confident; ties in index order",
             "comparison": "logit p_student(y) < logit p_teacher(y), strictly, float64"}
  for split in SPLITS:
    teacher_lo, student_lo = split_log_odds(context, split)
    results[split] = measure_split(context, teacher_lo, student_lo)
  _deviation_plot(os.path.join(context.plot_dir, "deviation.png"), context, results,
                  NUM_BUCKETS)
  return sections.Section(results=results, markdown=_deviation_markdown(context, results))


def _deviation_markdown(context, results: dict) -> str:
  num = results["num_buckets"]
  out = ["## Student-teacher deviations by teacher confidence (arXiv 2301.12923, Sec. 3)", "",
         "Each student is compared with its teacher point by point: the points are cut into "
         f"{num} equal-count buckets of the teacher's probability of the true class (1 = the "
         "hardest points for the teacher), and each cell is the fraction of the bucket's points "
         "on which the student is *less* confident than the teacher (mean ± std over seeds, in "
         "%). Above 50% in bucket 1: the student underfits the points the teacher finds hard, "
         "the paper's finding. `plots/confidence_scatter.png` shows the points themselves "
         "(Fig. 1's axes), `plots/deviation.png` these numbers and the mean log-odds gap.", ""]
  for split in SPLITS:
    res = results[split]
    words = "eval" if split == "test" else "train"
    out += [f"**{words.capitalize()} split**", "",
            "| group | " + " | ".join(f"bucket {k + 1}" for k in range(num)) + " | all points |",
            "|---|" + "---|" * (num + 1)]
    for name, entry in res["groups"].items():
      g = next(g for g in context.groups if g.name == name)
      cells = [_pct(m, s) for m, s in zip(entry["fraction_below"]["mean"],
                                          entry["fraction_below"]["std"])]
      cells.append(_pct(entry["fraction_below_all"]["mean"], entry["fraction_below_all"]["std"]))
      out.append(f"| {g.display} | " + " | ".join(cells) + " |")
    if res["teachers"]:
      ranges = res["teachers"][0]["confidence_range"]
      out += ["", f"Teacher 0's probability of the true class per bucket ({words}): " +
              ", ".join(f"{k + 1}: {lo:.3g}-{hi:.3g}" for k, (lo, hi) in enumerate(ranges)) + "."]
    out.append("")
  lines = []
  for name, entry in results["train"]["groups"].items():
    g = next(g for g in context.groups if g.name == name)
    low = entry["fraction_below"]["mean"][0]
    high = entry["fraction_below"]["mean"][-1]
    test_low = results["test"]["groups"][name]["fraction_below"]["mean"][0]
    if low is None or not np.isfinite(low):
      continue
    verdict = "underfit" if low > 0.5 else "do not underfit"
    lines.append(f"- {g.display} students {verdict} the teacher's hardest train points: below "
                 f"the teacher on {100 * low:.0f}% of bucket 1 (easiest bucket: "
                 f"{100 * high:.0f}%; eval split bucket 1: {100 * test_low:.0f}%).")
  return "\n".join(out + lines + ["", "![Deviation by teacher confidence](plots/deviation.png)"])


# ------------------------------------------------------------------------------------------------
# kd_switch


def describe_window(window: str) -> str:
  """'0.25-1' -> 'one-hot -> KD at 25%'; '0-0.5' -> 'KD -> one-hot at 50%'; '' -> labels only."""
  if not window:
    return "labels only"
  start, stop = (float(v) for v in window.split("-"))
  if start == 0 and stop == 1:
    return "KD throughout"
  if stop == 1:
    return f"one-hot -> KD at {100 * start:g}%"
  if start == 0:
    return f"KD -> one-hot at {100 * stop:g}%"
  return f"KD from {100 * start:g}% to {100 * stop:g}%"


@sections.register("kd_switch")
def kd_switch(context: sections.Context) -> sections.Section:
  """Final eval accuracy of each KD window: the loss-switching experiment (arXiv 2301.12923,
  Sec. 3: switching one-hot -> KD late in training recovers most of distillation's gain).

  Per group: accuracy mean and sample std over its included students; `minus_baseline` = mean
  minus the mean of the label-only group (the first group of an arm without a teacher signal,
  e.g. onehot, or siddo: same initialisation as the teacher, never distilled); `minus_full_kd` =
  mean minus the mean of the same arm's KD-throughout group (window 0-1) at the same other
  hyperparameters;
  `recovered` = minus_baseline / (full KD's minus_baseline), the share of full KD's gain a
  window keeps; null unless full KD's gain exceeds its standard error
  sqrt(s_kd^2 / n_kd + s_base^2 / n_base) (a ratio to a gain lost in seed noise means nothing).
  """
  accuracy = [m["accuracy"] for m in context.preds.student_metrics]
  rows = {}
  for g in context.groups:
    values = [accuracy[r] for r in g.included]
    if not values:
      continue
    mean, std = stats.mean_std(values)
    rows[g.name] = {"group": g.name, "arm": g.arm, "window": _window(context, g),
                    "n": len(values), "accuracies": [float(v) for v in values],
                    "mean": float(mean), "std": float(std)}
  baseline = next((name for name, row in rows.items()
                   if arms_lib.ARMS[row["arm"]].teacher_signal == "none"), None)
  by_name = {g.name: g for g in context.groups}
  for name, row in rows.items():
    row["description"] = describe_window(row["window"])
    row["minus_baseline"] = row["mean"] - rows[baseline]["mean"] if baseline else math.nan
    full = _full_kd(name, rows, by_name)
    row["full_kd"] = full
    row["minus_full_kd"] = row["mean"] - rows[full]["mean"] if full else math.nan
    gain = rows[full]["minus_baseline"] if full and baseline else math.nan
    noise = math.sqrt(rows[full]["std"]**2 / rows[full]["n"] +
                      rows[baseline]["std"]**2 / rows[baseline]["n"]) \
        if full and baseline else math.nan
    row["recovered"] = row["minus_baseline"] / gain if gain > noise else math.nan
  teachers = [float(t["accuracy"]) for t in context.preds.teacher_metrics]
  results = {"baseline": baseline, "teacher_accuracy": teachers, "rows": list(rows.values())}
  _switch_plot(os.path.join(context.plot_dir, "kd_switch.png"), context, results)
  return sections.Section(results=results, markdown=_switch_markdown(context, results))


def _full_kd(name: str, rows: dict, by_name: dict) -> str | None:
  """The KD-throughout (0-1) group of `name`'s arm at its other hyperparameters."""
  row = rows[name]
  if not row["window"]:
    return None
  others = {k: v for k, v in by_name[name].hparams if k != "window"}
  for other, candidate in rows.items():
    if candidate["arm"] == row["arm"] and candidate["window"] == "0-1" and others == {
        k: v for k, v in by_name[other].hparams if k != "window"}:
      return other
  return None


def _switch_plot(path: str, context, results: dict) -> None:
  rows = results["rows"]
  fig = Figure(figsize=(max(5.0, 1.1 * len(rows) + 2.0), 4.4), layout="constrained")
  ax = fig.subplots()
  rng = np.random.default_rng(0)
  by_name = {g.name: g for g in context.groups}
  for i, row in enumerate(rows):
    values = np.array(row["accuracies"])
    ax.scatter(i + rng.uniform(-0.12, 0.12, values.size), values, s=14, color=plots._color(i),
               lw=0, zorder=3)
    err = row["std"] if np.isfinite(row["std"]) else 0.0
    ax.errorbar(i, row["mean"], yerr=err, fmt="_", ms=18, color="black", capsize=4, zorder=4)
  if results["baseline"]:
    base = next(r for r in rows if r["group"] == results["baseline"])
    ax.axhline(base["mean"], color="gray", ls="--", lw=1,
               label=f"{by_name[base['group']].display} (labels only)")
  for j, acc in enumerate(results["teacher_accuracy"]):
    ax.axhline(acc, color="black", ls=":", lw=1, label="teacher" if j == 0 else None)
  labels = [f"{by_name[r['group']].display}\n{r['description']}" for r in rows]
  ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30 if len(rows) > 4 else 0,
                ha="right" if len(rows) > 4 else "center")
  ax.set_ylabel("final eval accuracy")
  ax.set_title("Loss switching (arXiv 2301.12923): accuracy per KD window, mean ± std over seeds",
               fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  plots._save(fig, path)


def _signed(value: float, scale: float = 100.0, unit: str = " pp") -> str:
  return "n/a" if not np.isfinite(value) else f"{scale * value:+.1f}{unit}"


def _switch_markdown(context, results: dict) -> str:
  by_name = {g.name: g for g in context.groups}
  out = ["## Loss switching: accuracy per KD window (arXiv 2301.12923, Sec. 3)", "",
         "Students trained on labels (one-hot) outside their KD window and with the "
         "distillation loss inside it; final eval accuracy, mean ± std over seeds. "
         "`vs labels only`: difference from the label-only group"
         + (f" ({by_name[results['baseline']].display})" if results["baseline"] else "") +
         "; `vs full KD`: difference from KD throughout; `gain kept`: the share of full KD's "
         "gain over labels only that the window keeps (n/a when that gain is within its standard "
         "error over seeds). Teacher accuracy: " +
         ", ".join(f"{100 * a:.1f}%" for a in results["teacher_accuracy"]) + ".", "",
         "| group | schedule | n | accuracy | vs labels only | vs full KD | gain kept |",
         "|---|---|---|---|---|---|---|"]
  for row in results["rows"]:
    acc = f"{100 * row['mean']:.2f}%" + (f" ± {100 * row['std']:.2f}"
                                         if np.isfinite(row["std"]) else "")
    kept = "n/a" if not np.isfinite(row["recovered"]) else f"{100 * row['recovered']:.0f}%"
    out.append(f"| {by_name[row['group']].display} | {row['description']} | {row['n']} | {acc} | "
               f"{_signed(row['minus_baseline'])} | {_signed(row['minus_full_kd'])} | {kept} |")
  out += ["", "![Accuracy per KD window](plots/kd_switch.png)"]
  return "\n".join(out)
