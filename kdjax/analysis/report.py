"""WORKDIR/analysis/report.md: what was run, the teachers, a table per arm, the tests with verdicts,
the excluded replicas and the plots, from the metrics.json content (no timestamps, so re-running
the analysis reproduces the file byte for byte)."""

from __future__ import annotations

import math
from typing import Sequence

from kdjax.analysis import statistics as stats_lib
from kdjax.analysis.statistics import Group

PLOTS = (
    ("confidence_scatter.png", "Teacher vs student confidence",
     "Each point is one eval example seen by one student: the teacher's and the student's "
     "probability of the true class, logit-transformed (arXiv 2301.12923, Fig. 1). Points below "
     "the dashed y = x line are examples where the student is less confident than its teacher; "
     "red points are the teacher's errors."),
    ("agreement_split.png", "Agreement split by teacher correctness",
     "Top-1 agreement with the teacher on the points the teacher gets right and on those it gets "
     "wrong (arXiv 2510.12615). Higher agreement on teacher-incorrect points than the controls "
     "means the teacher's errors were transferred: the negative asymmetric payoff."),
    ("metrics.png", "Every metric per arm",
     "The distribution over students of each metric; one dot per student."),
)


def _num(x, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}f}"


def _summary_cell(s: dict) -> str:
  if s["n"] == 0:
    return "n/a (n = 0)"
  cell = _num(s["mean"])
  if s["n"] >= 2:
    cell += f" ± {_num(s['std'])} [{_num(s['ci_low'])}, {_num(s['ci_high'])}]"
  return cell


def _config_rows(config, num_eval: int, num_classes: int) -> list[tuple[str, str]]:
  def model(name, kwargs):
    kw = ", ".join(f"{k}={v}" for k, v in sorted(dict(kwargs).items()))
    return f"`{name}`" + (f" ({kw})" if kw else "")

  teacher_epochs = config.teacher_num_epochs if config.teacher_num_epochs > 0 \
      else config.num_epochs
  opt = config.optimizer
  return [
      ("dataset", f"`{config.dataset}` ({num_eval} eval examples, {num_classes} classes)"),
      ("student model", model(config.model, config.model_kwargs)),
      ("teacher model", model(config.teacher_model, config.teacher_model_kwargs)
       if config.teacher_model else "the students' model (self-distillation)"),
      ("arms", ", ".join(f"`{a.strip()}`" for a in str(config.arms).split(",") if a.strip())),
      ("seeds per arm and grid point", str(config.num_seeds)),
      ("teachers", str(config.num_teachers)),
      ("alpha", str(config.alpha)), ("temperature", str(config.temperature)),
      ("KD windows (fractions of training)", str(config.kd_windows)),
      ("student init", str(config.student_init)),
      ("epochs (students / teachers)", f"{config.num_epochs} / {teacher_epochs}"),
      ("batch size", str(config.batch_size)),
      ("optimizer", f"{opt.name}, learning rate {opt.learning_rate}, {opt.schedule} schedule, "
                    f"weight decay {opt.weight_decay}"),
      ("augmentation", str(config.augment) + (
          f" (teachers: {config.teacher_augment})" if config.get("teacher_augment") else "")),
      ("config seed", str(config.seed)),
  ]


def render(*, command: str | None, study, results: dict, groups: Sequence[Group],
           metric_names: Sequence[str], exclusions: Sequence[str], num_excluded: int,
           num_predictions: int) -> str:
  """The report's markdown. `results` is the metrics.json content before JSON encoding;
  `num_predictions` is the number of labels (examples, or tokens for sequence labels)."""
  config, num_eval, num_classes = study.config, study.num_eval, study.dataset.num_classes
  by_name = {g.name: g for g in groups}
  augments = [getattr(t, "augment", None) for t in study.teacher.replicas]
  show_augment = len(set(augments)) > 1
  out = [f"# kdjax analysis: `{config.dataset}`, arms {', '.join(g.display for g in groups)}",
         ""]
  out += ["Command:", "", "```", command or "(not recorded: kdjax.analysis.run called from "
          "Python)", "```", "",
          "All numbers are on the eval split; students are compared with their own teacher "
          "(softmax at T = 1, natural logs; definitions in DESIGN.md). Files beside this "
          "report: `metrics.json` (every number below), `predictions.npz` (every logit), "
          "`plots/`.", ""]

  out += ["## Study", "", "| setting | value |", "|---|---|"]
  out += [f"| {k} | {v} |" for k, v in _config_rows(config, num_eval, num_classes)]
  out.append("")

  out += ["## Teachers", "",
          "| teacher | seed |" + (" augmentation |" if show_augment else "") +
          " accuracy | ECE | errors on the eval split |",
          "|---|---|" + ("---|" if show_augment else "") + "---|---|---|"]
  for t, augment in zip(results["teachers"], augments):
    m = t["metrics"]
    flag = " (diverged)" if t["diverged"] else ""
    out.append(f"| {t['index']}{flag} | {t['seed']} |" + (f" {augment} |" if show_augment else "")
               + f" {_num(m['accuracy'])} | {_num(m['ece'])} | {m['num_incorrect']} of "
               f"{num_predictions} |")
  out.append("")
  agreement = results.get("teacher_agreement")
  if agreement:
    out += ["Teacher-teacher similarity, the reference level of seed-to-seed variation "
            f"(mean over {len(agreement['pairs'])} teacher "
            f"pair{'s' if len(agreement['pairs']) > 1 else ''}; teacher b vs teacher a):", "",
            "| metric | mean over pairs |", "|---|---|"]
    out += [f"| {k} | {_num(v)} |" for k, v in agreement["mean"].items()]
    out.append("")

  out += ["## Students per arm", "",
          "mean ± std [95% bootstrap CI of the mean] over the students of each arm "
          "(diverged students excluded). Arrows: the direction that means more similar to the "
          "teacher (accuracy, ece: better).", ""]
  arms = results["arms"]
  header = ["metric"] + [f"{g.display} (n = {len(g.included)})" for g in groups]
  out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for m in metric_names:
    arrow = "↑" if stats_lib.HIGHER_IS_MORE_SIMILAR[m] > 0 else "↓"
    cells = []
    for g in groups:
      s = arms[g.name][m]
      cell = _summary_cell(s)
      if s["n"] != len(g.included):
        cell += f" (n = {s['n']})"
      cells.append(cell)
    out.append(f"| {m} {arrow} | " + " | ".join(cells) + " |")
  out.append("")

  out += ["## Tests", ""]
  tests = results["tests"]
  if not tests:
    out += ["No tests: the study has a single arm.", ""]
  else:
    ref = groups[[g.name for g in groups].index(tests[0]["a"])].display
    out += [f"Two-sided Mann-Whitney U test of {ref.split('[')[0]} against every other arm, per "
            "metric, over the students' values (the protocol of arXiv 2510.12615); r is the "
            "rank-biserial correlation (r > 0: the first arm's values tend to be larger); "
            f"p-values are Holm-corrected across the {len(metric_names)} metrics of each "
            f"comparison; verdicts at p_holm <= {stats_lib.SIGNIFICANCE}. The column 'p by' "
            "says how each p-value was computed: exact (the exact null distribution of U, no "
            "ties), permutation (every split of the tied values enumerated), monte_carlo "
            "(9,999 seeded random splits) or asymptotic (normal approximation, large tied "
            "samples only).", ""]
    pairs = list(dict.fromkeys((t["a"], t["b"]) for t in tests))
    for a, b in pairs:
      block = [t for t in tests if (t["a"], t["b"]) == (a, b)]
      out += [f"### {by_name[a].display} vs {by_name[b].display}", "",
              "| metric | U | p | p_holm | r | n | p by |", "|---|---|---|---|---|---|---|"]
      for t in block:
        star = " *" if stats_lib.is_significant(t) else ""
        u = "n/a" if not math.isfinite(t["statistic"]) else f"{t['statistic']:g}"
        r = "n/a" if not math.isfinite(t["effect_size"]) else f"{t['effect_size']:+.2f}"
        out.append(f"| {t['metric']} | {u} | {stats_lib.format_p(t['p_value'])} | "
                   f"{stats_lib.format_p(t['p_holm'])}{star} | {r} | "
                   f"{t['n_a']} vs {t['n_b']} | {t.get('p_method') or 'n/a'} |")
      out.append("")
      out += [f"- {line}" for line in stats_lib.comparison_verdicts(block, by_name)]
      out.append("")

  out += ["## Diverged and excluded replicas", ""]
  if exclusions:
    num_students = len(results["replicas"])
    out += [f"{num_excluded} of {num_students} student replicas are excluded from the "
            "per-arm statistics and the tests:", ""]
    out += [f"- {line}" for line in exclusions]
  else:
    out.append("None: every teacher and student produced finite logits on the eval split.")
  out.append("")

  out += ["## Plots", ""]
  for name, title, caption in PLOTS:
    out += [f"### {title}", "", f"![{title}](plots/{name})", "", caption, ""]
  return "\n".join(out)
