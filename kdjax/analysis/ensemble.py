"""Section `ensemble_attention`: attention diversity and fidelity in ensemble distillation (Guo et
al., "Why does Knowledge Distillation Work? Rethink its Attention and Fidelity Mechanism",
arXiv 2405.00739).

Teachers trained with weak or strong augmentation are combined into ensembles (kdjax.replicas,
`ensembles`: "weak+weak,strong+weak,strong+strong") and distilled into students by the arms whose
teacher signal is 'ensemble' (ensemble_kd, ensemble_standardized_kd). For every group of such
students (arm x ensemble composition x grid point), on the eval split, with s a student's logits,
t_m the logits of its ensemble's M members and y the labels:

  accuracy             mean[argmax s = y];
  ensemble             p_E = (1/M) sum_m softmax(t_m): the mixture the student is trained
                       toward (kdjax/arms.py, "Ensembles");
  agreement            fidelity as top-1 agreement, mean[argmax s = argmax p_E];
  kl_divergence        fidelity as mean KL(p_E || softmax(s)) (nats);
  mutual_information   MI (nats) between argmax s and argmax p_E from their empirical joint
                       distribution (kdjax.metrics.mutual_information; sklearn's
                       mutual_info_score in the authors' code);
  teacher_iou          the attention-map IoU of the ensemble's members: for every pair (a, b) of
                       members, the mean over eval examples of
                       kdjax.metrics.attention_iou(A_a, A_b, threshold=0.5), where the attention
                       map A of a teacher is, as in the authors' released code, its class-summed
                       class activation map sum_c CAM_c = F_cam . (sum_c W[:, c]) (Zhou et al.,
                       arXiv 1512.04150; the head bias only shifts the map, which min-max
                       normalisation removes), bilinearly resized to the input's size, min-max
                       normalised and binarised at 0.5; averaged over the pairs of each
                       student's ensemble and over the group's students;
  teacher_agreement    mean[argmax t_a = argmax t_b] over the same pairs.
Each number is the mean ± sample std over the group's included students (diverged ones left
out). Two differences from the authors' code, on purpose: the IoU is computed per example and
then averaged (the authors pool intersections and unions over each batch of 128, which weights
examples by the size of their maps and depends on the batch size), and fidelity and MI use the
members' mixture, the student's own training target (the authors average the members' logits).

The paper's findings at full scale: stronger augmentation makes the teachers' attention maps
diverge (lower IoU) and the student generalise better while its fidelity (agreement, KL) and MI
with the ensemble fall; logit standardisation raises accuracy but not fidelity.
Plot `ensemble_attention.png`: teacher IoU (x) against student accuracy, agreement and MI, one
marker per group.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from kdjax import arms as arms_lib
from kdjax import data as data_lib
from kdjax import losses
from kdjax import metrics as metrics_lib
from kdjax import models as models_lib
from kdjax import stats
from kdjax.analysis import plots
from kdjax.analysis import sections

IOU_THRESHOLD = 0.5  # the authors' binarisation of the min-max normalised map
STUDENT_METRICS = ("accuracy", "agreement", "kl_divergence", "mutual_information")


def attention_map(module, variables, x) -> jax.Array:
  """[B, H, W] attention maps (see the module docstring) of one model on the input batch x:
  the class-summed CAM, bilinearly resized to the input's spatial size (a 1-D map, e.g. audio,
  becomes [B, 1, L])."""
  _, features, _ = models_lib.apply_with_features(module, variables, x, train=False)
  if "cam" not in features:
    raise ValueError(f"{type(module).__name__} has no spatial feature map")
  kernel = variables["params"]["head"]["kernel"]
  summed = jnp.sum(kernel, axis=1, keepdims=True)  # [K, 1]: sum over classes of W[:, c]
  cam = models_lib.cam_from_features(features["cam"], summed,
                                     jnp.zeros(x.shape[:1], jnp.int32))
  spatial = x.shape[1:-1]
  cam = jax.image.resize(cam, cam.shape[:1] + spatial, "bilinear")
  return cam if cam.ndim == 3 else cam[:, None, :]


def ensemble_logits(teacher_logits: np.ndarray, members) -> np.ndarray:
  """Logits of the members' mixture, log((1/M) sum_m softmax(t_m)) (losses.ensemble_teacher_logits)."""
  return np.asarray(losses.ensemble_teacher_logits(
      jnp.asarray(teacher_logits[list(members)]), axis=0, mode="mean_probs"))


def fidelity(student_logits: np.ndarray, teacher_logits: np.ndarray, members,
             labels: np.ndarray) -> dict[str, float]:
  """One student's accuracy, agreement, KL and MI with its ensemble (module docstring)."""
  num_classes = student_logits.shape[-1]
  s = jnp.asarray(student_logits.reshape(-1, num_classes))
  e = jnp.asarray(ensemble_logits(teacher_logits, members).reshape(-1, num_classes))
  y = labels.reshape(-1)
  s_pred, e_pred = np.asarray(jnp.argmax(s, -1)), np.asarray(jnp.argmax(e, -1))
  return {"accuracy": float(np.mean(s_pred == y)),
          "agreement": float(np.mean(s_pred == e_pred)),
          "kl_divergence": float(np.mean(np.asarray(metrics_lib.kl_divergence(e, s)),
                                         dtype=np.float64)),
          "mutual_information": float(metrics_lib.mutual_information(
              jnp.asarray(s_pred), jnp.asarray(e_pred), num_classes))}


def pair_iou(context: sections.Context, pairs) -> dict[tuple[int, int], float]:
  """{(a, b): mean attention IoU over the eval split} for teacher index pairs, from the final
  teachers (`context.teachers`; module docstring); NaN for models without a spatial map.
  Examples where both maps are constant (IoU undefined) are left out of the mean."""
  study, teachers = context.study, context.teachers
  pairs = sorted(set(pairs))
  if not pairs:
    return {}
  needed = sorted({j for p in pairs for j in p})
  jitted = {}

  def maps_fn(engine):
    if engine.group.key not in jitted:
      module = engine.module
      jitted[engine.group.key] = jax.jit(lambda v, x: attention_map(module, v, x))
    return jitted[engine.group.key]

  probe = study.dataset.example_input()
  has_map = {j: "cam" in models_lib.feature_names(teachers.engine_of(j).module, probe)
             for j in needed}
  device_arrays = data_lib.to_device(study.data["test"], teachers.engines[0].replicated)
  sums = {p: 0.0 for p in pairs}
  counts = {p: 0 for p in pairs}
  variables = {j: teachers.replica_variables(j) for j in needed if has_map[j]}
  for batch in data_lib.eval_batches(device_arrays, study.dataset, study.run.eval_batch_size):
    maps = {j: maps_fn(teachers.engine_of(j))(v, batch.x)[:batch.num_valid]
            for j, v in variables.items()}
    for a, b in pairs:
      if a in maps and b in maps:
        iou = np.asarray(metrics_lib.attention_iou(maps[a], maps[b], threshold=IOU_THRESHOLD))
        sums[(a, b)] += float(np.nansum(iou))
        counts[(a, b)] += int(np.sum(np.isfinite(iou)))
  return {p: sums[p] / counts[p] if counts[p] else math.nan for p in pairs}


def _summary(values) -> dict[str, float]:
  mean, std = stats.mean_std(values)
  return {"mean": float(mean), "std": float(std)}


@sections.register("ensemble_attention")
def ensemble_attention(context: sections.Context) -> sections.Section:
  study, preds = context.study, context.preds
  replicas = study.students.replicas
  ensemble_groups = [g for g in context.groups
                     if arms_lib.ARMS[g.arm].reads == "ensemble" and g.included]
  member_pairs = {r: list(itertools.combinations(sorted(replicas[r].ensemble), 2))
                  for g in ensemble_groups for r in g.included}
  ious = pair_iou(context, [p for ps in member_pairs.values() for p in ps])
  t_pred = np.argmax(preds.teacher_logits, -1)
  teacher_agreement = {p: float(np.mean(t_pred[p[0]] == t_pred[p[1]])) for p in ious}

  per_replica, groups = [], {}
  for g in ensemble_groups:
    rows = []
    for r in g.included:
      row = {"index": int(r), "group": g.name, "ensemble": list(replicas[r].ensemble),
             **fidelity(preds.student_logits[r], preds.teacher_logits, replicas[r].ensemble,
                        preds.labels)}
      pairs = member_pairs[r]
      row["teacher_iou"] = float(np.mean([ious[p] for p in pairs])) if pairs else math.nan
      row["teacher_agreement"] = float(np.mean([teacher_agreement[p] for p in pairs])) \
          if pairs else math.nan
      rows.append(row)
    per_replica += rows
    groups[g.name] = {
        "arm": g.arm, "display": g.display,
        "composition": replicas[g.included[0]].teacher_augment or "all teachers",
        "n": len(rows),
        **{m: _summary([row[m] for row in rows])
           for m in STUDENT_METRICS + ("teacher_iou", "teacher_agreement")}}
  teachers = [{"index": t.index, "augment": t.augment, "seed": t.seed, "model": t.model,
               "accuracy": preds.teacher_metrics[t.index]["accuracy"]}
              for t in study.teacher.replicas]
  results = {"iou_threshold": IOU_THRESHOLD, "teachers": teachers,
             "teacher_pairs": [{"a": a, "b": b, "iou": ious[(a, b)],
                                "agreement": teacher_agreement[(a, b)]} for a, b in ious],
             "groups": groups, "replicas": per_replica}
  if groups:
    _plot(f"{context.plot_dir}/ensemble_attention.png", groups)
  return sections.Section(results=results, markdown=_markdown(results))


def _plot(path: str, groups: dict) -> None:
  fig = Figure(figsize=(13, 4.2), layout="constrained")
  axes = fig.subplots(1, 3)
  arms = list(dict.fromkeys(g["arm"] for g in groups.values()))
  markers = "os^Dv<>"
  for ax, metric, label in zip(axes, ("accuracy", "agreement", "mutual_information"),
                               ("student accuracy", "agreement with the ensemble (fidelity)",
                                "MI(student; ensemble) [nats]")):
    for name, g in groups.items():
      x, y = g["teacher_iou"]["mean"], g[metric]["mean"]
      i = arms.index(g["arm"])
      ax.errorbar(x, y, yerr=None if not np.isfinite(g[metric]["std"]) else g[metric]["std"],
                  fmt=markers[i % len(markers)], color=plots._color(i),
                  label=g["display"].split("[")[0] if name == next(
                      n for n, h in groups.items() if h["arm"] == g["arm"]) else None)
      ax.annotate(g["composition"], (x, y), textcoords="offset points", xytext=(4, 4),
                  fontsize=7)
    ax.set_xlabel("teacher-teacher attention IoU (CAM)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("Ensemble distillation: attention diversity vs accuracy and fidelity "
               "(arXiv 2405.00739)", fontsize=10)
  plots._save(fig, path)


def _fmt(entry, spec: str = ".3f") -> str:
  mean, std = entry["mean"], entry["std"]
  if not np.isfinite(mean):
    return "n/a"
  return f"{mean:{spec}}" + (f" ± {std:{spec}}" if np.isfinite(std) else "")


def _markdown(results: dict) -> str:
  lines = ["## Ensemble distillation: attention and fidelity", "",
           "Guo et al. (arXiv 2405.00739): teachers trained with stronger augmentation attend to "
           "more different regions (lower attention-map IoU); their ensemble yields students "
           "that generalise better while agreeing less with it (lower fidelity and mutual "
           "information); logit standardisation raises accuracy, not fidelity. Attention map: "
           "the class-summed CAM, resized to the input, min-max normalised, binarised at "
           f"{results['iou_threshold']:g}. Mean ± std over each group's students.", ""]
  if not results["groups"]:
    return "\n".join(lines + ["No student learns from an ensemble in this study."])
  lines += ["| students | ensemble | n | accuracy | agreement | KL(ens ‖ s) | MI [nats] | "
            "teacher IoU | teacher agreement |", "|---|---|---|---|---|---|---|---|---|"]
  for g in results["groups"].values():
    lines.append(f"| {g['display']} | {g['composition']} | {g['n']} | {_fmt(g['accuracy'])} | "
                 f"{_fmt(g['agreement'])} | {_fmt(g['kl_divergence'])} | "
                 f"{_fmt(g['mutual_information'])} | {_fmt(g['teacher_iou'])} | "
                 f"{_fmt(g['teacher_agreement'])} |")
  lines += ["", "Teachers: " + ", ".join(
      f"#{t['index']} {t['augment']} seed {t['seed']} ({t['accuracy']:.3f})"
      for t in results["teachers"]), "",
      "![attention IoU vs accuracy and fidelity](plots/ensemble_attention.png)"]
  return "\n".join(lines)
