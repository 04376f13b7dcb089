"""WORKDIR/analysis/report.md: what was run, the teachers, a table per arm, the tests with verdicts,
the excluded replicas and the plots, from the metrics.json content (no timestamps, so re-running
the analysis reproduces the file byte for byte)."""

from __future__ import annotations

import math
from typing import Sequence

from kdjax.analysis import statistics
from kdjax.analysis.statistics import ArmGroup

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


def render(*, command: str | None, study, results: dict, groups: Sequence[ArmGroup],
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
  out += _no_verdict_note(results, by_name)
  out += ["Command:", "", "```", command or "(not recorded: kdjax.analysis.run called from "
          "Python)", "```", "",
          "All numbers are on the eval split; students are compared with their own teacher "
          "(softmax at T = 1, natural logs; definitions in kdjax's docs/design.md). Files "
          "beside this report: `metrics.json` (every number below), `predictions.npz` (every "
          "logit), `plots/`, `replicas.csv` (one row per student), `classes.csv` (per class and "
          "arm).", ""]

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
    arrow = "↑" if statistics.HIGHER_IS_MORE_SIMILAR[m] > 0 else "↓"
    cells = []
    for g in groups:
      s = arms[g.name][m]
      cell = _summary_cell(s)
      if s["n"] != len(g.included):
        cell += f" (n = {s['n']})"
      cells.append(cell)
    out.append(f"| {m} {arrow} | " + " | ".join(cells) + " |")
  out.append("")
  out += _teacher_note(results, groups, len(results["teachers"]))

  out += ["## Tests", ""]
  tests = results["tests"]
  if not tests:
    out += ["No tests: the study has a single arm.", ""]
  else:
    ref = groups[[g.name for g in groups].index(tests[0]["a"])].display
    out += [f"Two-sided tests of {ref.split('[')[0]} against every other arm, per metric, over "
            "the students' values (the protocol of arXiv 2510.12615). Where every student of "
            "one arm has a partner of the same seed in the other (same initialisation and data "
            "order), the Wilcoxon signed-rank test on the seed-matched differences (statistic "
            "W+, the rank sum of the positive differences; zero differences dropped); "
            "otherwise the Mann-Whitney U test (statistic U). r is the rank-biserial "
            "correlation (matched-pairs for Wilcoxon; r > 0: the first arm's values tend to be "
            f"larger); p-values are Holm-corrected across the {len(metric_names)} metrics of "
            f"each comparison; verdicts at p_holm <= {statistics.SIGNIFICANCE}. The column 'p by' "
            "says how each p-value was computed: exact (the exact null distribution, no ties), "
            "permutation (every split, or every sign assignment, of the tied values "
            "enumerated), monte_carlo (9,999 seeded random splits) or asymptotic (normal "
            "approximation, large tied samples only). Equivalence: two one-sided t-tests "
            "(TOST, paired t on seed-matched pairs, else Welch) against the margin of each "
            f"metric, Holm-corrected the same way; 'equivalent' at TOST p_holm <= "
            f"{statistics.SIGNIFICANCE} (margins: `--config.{statistics.MARGINS_KEY}`).", ""]
    pairs = list(dict.fromkeys((t["a"], t["b"]) for t in tests))
    for a, b in pairs:
      block = [t for t in tests if (t["a"], t["b"]) == (a, b)]
      out += [f"### {by_name[a].display} vs {by_name[b].display}", "",
              "| metric | test | W+ or U | p | p_holm | r | n | p by | margin | TOST p_holm "
              "| equivalent |", "|---|---|---|---|---|---|---|---|---|---|---|"]
      for t in block:
        star = " *" if statistics.is_significant(t) else ""
        u = "n/a" if not math.isfinite(t["statistic"]) else f"{t['statistic']:g}"
        r = "n/a" if not math.isfinite(t["effect_size"]) else f"{t['effect_size']:+.2f}"
        n = (f"{t['n_pairs']} pairs" if t.get("test") == "wilcoxon"
             else f"{t['n_a']} vs {t['n_b']}")
        e = t.get("equivalence")
        tost = (f"+-{e['margin']:g} | {statistics.format_p(e['p_holm'])} | "
                f"{'yes' if e['equivalent'] else 'no'}") if e else "n/a | n/a | n/a"
        out.append(f"| {t['metric']} | {_TEST_SHORT.get(t.get('test'), 'n/a')} | {u} | "
                   f"{statistics.format_p(t['p_value'])} | "
                   f"{statistics.format_p(t['p_holm'])}{star} | {r} | {n} | "
                   f"{t.get('p_method') or 'n/a'} | {tost} |")
      out.append("")
      out += [f"- {statistics.test_choice(block)}"]
      out += [f"- {line}" for line in statistics.comparison_verdicts(block, by_name)]
      out += [f"- {line}" for line in statistics.equivalence_lines(block, by_name)]
      out.append("")
    out += _power_section(tests, by_name, config)
  out += _null_reference_section(results, groups)

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
  if "curves" in results:
    steps = results["curves"]["steps"]
    out += ["### Similarity over training", "", "![Similarity over training](plots/curves.png)",
            "", f"Each student's accuracy, agreement with its teacher (all points, teacher-correct "
            f"and teacher-incorrect points) and JS divergence on the eval split at "
            f"{len(steps)} eval steps ({steps[0]} to {steps[-1]}): the mean over each arm's "
            "students with the min-max band. When during training do the teacher's errors "
            "transfer? Compare the teacher-incorrect panel's arms over steps (numbers: "
            "`metrics.json` \"curves\").", ""]
  return "\n".join(out)


_TEST_SHORT = {"wilcoxon": "Wilcoxon", "mann_whitney": "Mann-Whitney"}


def _no_verdict_note(results: dict, by_name: dict) -> list[str]:
  """The report's first lines when some comparison cannot reach a verdict (issue 15)."""
  blocked = statistics.no_verdict_comparisons(results.get("tests") or [])
  if not blocked:
    return []
  out = []
  for a, b, power in blocked:
    block = [t for t in results["tests"] if (t["a"], t["b"]) == (a, b) and t.get("power")]
    t = min(block, key=lambda t: t["power"]["min_p_holm"])
    n = (f"{t['n_pairs']} seed-matched pairs" if t["test"] == "wilcoxon"
         else f"{t['n_a']} vs {t['n_b']} students")
    seeds = power["seeds_for_verdict"]
    fix = (f"`--config.num_seeds={seeds}` would make one possible" if seeds
           else "no seed count within reach would make one possible")
    out.append(f"> **No verdict is possible for {by_name[a].display} vs {by_name[b].display}:** "
               f"with {n}, the smallest p-value the {statistics.TEST_NAMES[t['test']]} test can "
               f"reach is {statistics.format_p(power['min_p'])}, "
               f"{statistics.format_p(power['min_p_holm'])} after Holm across "
               f"{power['num_tests']} metrics, above {statistics.SIGNIFICANCE} whatever the data; "
               f"{fix} (seeds for 80% power at the observed effects: section Power).")
    out.append(">")
  return out[:-1] + [""]


def _teacher_note(results: dict, groups: Sequence[ArmGroup], num_teachers: int) -> list[str]:
  """How the intervals were computed and what the number of teachers allows (issue 15)."""
  counts = sorted({s["agreement"]["n_teachers"] for s in results["arms"].values()
                   if s["agreement"]["n"] >= 2})
  if num_teachers == 1 or counts == [1]:
    return ["Intervals: percentile bootstrap over the students. All students of an arm learn "
            "from one teacher, so these intervals and the tests below describe students of this "
            "teacher; whether another teacher gives the same answer is not measured (train "
            "several with `--config.num_teachers`, 5 or more for the cluster bootstrap to see "
            "teacher-to-teacher variation).", ""]
  few = max(counts) if counts else 0
  note = (f"Intervals: students are nested in teachers, so where an arm's students learn from "
          f"several teachers the CI is the two-stage cluster bootstrap (teachers with "
          f"replacement, then students within each), {', '.join(map(str, counts))} teacher(s) "
          "per arm.")
  if few < 5:
    note += (f" With at most {few} teachers, the bootstrap can only recombine {few} teacher "
             "means, so its intervals understate the variation between teachers and the tests "
             "(which treat students as independent) generalise poorly beyond these teachers; "
             "5 or more teachers (`--config.num_teachers`) are needed for conclusions about "
             "teachers in general.")
  return [note, ""]


def _seeds(value) -> str:
  return f"more than {statistics.MAX_POWER_SEEDS}" if value is None else str(value)


def _power_section(tests: Sequence[dict], by_name: dict, config) -> list[str]:
  """## Power: per comparison and metric, the smallest reachable p / p_holm, and seeds."""
  out = ["## Power", "",
         "What the seeds at hand can show. 'smallest p' is the smallest p-value the test can "
         "reach with these n whatever the data (all differences of one sign, or a complete "
         "separation of the arms), 'after Holm' multiplies it by the number of metrics tested. "
         "'seeds for 80% power' is the number of seeds per arm with which the test would "
         "detect the observed difference with probability 0.8, at 0.05 and at 0.05/m (the "
         "strictest Holm step, sufficient for a verdict after Holm), estimated by "
         f"{statistics.POWER_METHOD}; 'more than {statistics.MAX_POWER_SEEDS}': no or a tiny "
         f"observed difference. The study has {config.num_seeds} seeds per arm and grid point.",
         ""]
  for a, b in dict.fromkeys((t["a"], t["b"]) for t in tests):
    block = [t for t in tests if (t["a"], t["b"]) == (a, b) and t.get("power")]
    if not block:
      continue
    out += [f"### {by_name[a].display} vs {by_name[b].display}", "",
            "| metric | test | smallest p | after Holm | verdict possible | seeds for 80% "
            "power at 0.05 | at 0.05/m |", "|---|---|---|---|---|---|---|"]
    for t in block:
      p = t["power"]
      out.append(f"| {t['metric']} | {_TEST_SHORT[t['test']]} | {statistics.format_p(p['min_p'])}"
                 f" | {statistics.format_p(p['min_p_holm'])} | "
                 f"{'yes' if p['verdict_possible'] else 'no'} | {_seeds(p['seeds_for_power'])} | "
                 f"{_seeds(p['seeds_for_power_holm'])} |")
    out.append("")
  return out


def _null_reference_section(results: dict, groups: Sequence[ArmGroup]) -> list[str]:
  """## Null references: each arm's similarity to its teacher next to that of unrelated pairs."""
  ref = results.get("null_reference")
  if not ref:
    return []
  out = ["## Null references", "",
         "How similar models get without distillation: each arm's students against their "
         "teacher, next to pairs of its students of different seeds (student b against "
         "student a; mean [min, max] over the pairs)"
         + (", pairs of teachers" if "teacher_pairs" in ref else "")
         + (" and one-hot students (fresh initialisation, labels only) against the teacher"
            if ref["teacher_onehot"] else "") +
         ". A KD student's agreement with its teacher is informative where it exceeds what "
         "two such models reach anyway.", "",
         "| arm | agreement with teacher | agreement between its students | JS with teacher | "
         "JS between its students | pairs |", "|---|---|---|---|---|---|"]
  arms = results["arms"]

  def spread(s):
    if not math.isfinite(s["mean"]):
      return "n/a"
    return f"{s['mean']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"

  for g in groups:
    pairs = ref["student_pairs"][g.name]
    out.append(f"| {g.display} | {_num(arms[g.name]['agreement']['mean'])} | "
               f"{spread(pairs['metrics']['agreement'])} | "
               f"{_num(arms[g.name]['js_divergence']['mean'])} | "
               f"{spread(pairs['metrics']['js_divergence'])} | {pairs['n_pairs']} |")
  out.append("")
  if "teacher_pairs" in ref:
    t = ref["teacher_pairs"]
    out.append(f"Teacher pairs ({t['n_pairs']}): agreement {_num(t['mean']['agreement'])}, JS "
               f"{_num(t['mean']['js_divergence'])}.")
  for name, t in ref["teacher_onehot"].items():
    out.append(f"One-hot students against the teacher ({name}, n = {t['n']}): agreement "
               f"{_num(t['mean']['agreement'])}, JS {_num(t['mean']['js_divergence'])}.")
  if "teacher_pairs" in ref or ref["teacher_onehot"]:
    out.append("")
  return out
