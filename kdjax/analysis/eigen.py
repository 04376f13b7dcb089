"""Report sections on the linear-model theory of arXiv 2301.12923 (Sec. 4), from every checkpoint.

Nagarajan et al., "On student-teacher deviations in distillation: does it pay to disobey?"
(arXiv 2301.12923) analyse a linear model trained by gradient descent: a teacher trained on
one-hot labels and stopped early, and a student distilled from it. Theorem 4.1: distillation
exaggerates gradient descent's implicit bias, the student converging along the top
eigendirections of the data as the teacher does but lagging further behind along the bottom
ones. Theorem 4.3: with similar classes, the one-hot gradient on a point's similar (non-target)
classes is destructive and the teacher's probabilities denoise it. Two sections measure both on
a study whose teacher and students are kdjax's `linear` model, from the weights saved at every
checkpoint step (set `checkpoint_every_steps` small and `keep_checkpoints` large):

  eigen_trajectory    the projection of each model's weights on each eigendirection of the
                      training inputs' second-moment matrix, per step, relative to the teacher's
                      final projection; plots/eigen_trajectory.png, the curves in
                      analysis/eigen_trajectory.npz
  gradient_denoising  (synthetic data only) the alignment of each model's weight updates with
                      the Bayes-optimal weights of the generating model, over all classes and
                      within superclasses, and the eval accuracy per step;
                      plots/gradient_denoising.png, the curves in analysis/gradient_denoising.npz

With full-batch gradient descent (batch_size = the train split, momentum and weight decay 0,
constant learning rate) the saved weights are exactly the paper's GD iterates.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from kdjax import checkpoint as checkpoint_lib
from kdjax import data as data_lib
from kdjax import train
from kdjax import workdir as workdir_lib
from kdjax.analysis import plots
from kdjax.analysis import sections
from kdjax.data import synthetic

FRACTIONS = (0.5, 0.9)


# ------------------------------------------------------------------------------------------------
# Pure measurements (numpy, float64).


def second_moment_eigh(x) -> tuple[np.ndarray, np.ndarray]:
  """Eigenvalues (descending) and eigenvectors (columns) of Sigma = X^T X / N, X = [N, D].

  For a bias-free linear model f(x) = x W the squared loss's Hessian is Sigma (x) I, so
  gradient descent moves along Sigma's i-th eigendirection at a rate set by lambda_i: the
  eigenbasis of the theory (arXiv 2301.12923, Sec. 4). Uncentered, because the model has no
  bias to absorb the mean."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  values, vectors = np.linalg.eigh(x.T @ x / x.shape[0])
  return values[::-1].copy(), vectors[:, ::-1].copy()


def class_centering(num_classes: int) -> np.ndarray:
  """P = I - 1 1^T / C: softmax ignores a vector added to every class's weights, W P removes it."""
  return np.eye(num_classes) - 1.0 / num_classes


def within_superclass_centering(superclass: np.ndarray) -> np.ndarray:
  """Q[c', c] = [c' = c] - [s(c') = s(c)] / |s(c)|: W Q keeps, per class, its weights minus the
  mean weights of its superclass, the part that tells similar classes apart."""
  s = np.asarray(superclass)
  same = (s[:, None] == s[None, :]).astype(np.float64)
  return np.eye(len(s)) - same / same.sum(0, keepdims=True)


def eigen_projections(kernels, init, eigenvectors) -> np.ndarray:
  """A[..., i] = || v_i^T (W - W_0) P ||_2: how far the weights have moved along eigendirection
  v_i (the class-centred displacement, so directions softmax ignores do not count).
  kernels [..., D, C], init broadcastable to it, eigenvectors [D, D] (columns)."""
  k = np.asarray(kernels, np.float64)
  delta = (k - np.asarray(init, np.float64)) @ class_centering(k.shape[-1])
  return np.linalg.norm(np.einsum("di,...dc->...ic", np.asarray(eigenvectors), delta), axis=-1)


def first_reach(steps, values, reference, fraction: float) -> list[int | None]:
  """Per direction i, the first step s (of `steps`, ascending) with
  values[s, i] >= fraction * reference[i]; None if none does. values [S, D], reference [D]."""
  reached = np.asarray(values) >= fraction * np.asarray(reference)[None]
  return [int(steps[np.argmax(reached[:, i])]) if reached[:, i].any() else None
          for i in range(reached.shape[1])]


def cosine(a, b) -> np.ndarray:
  """Frobenius cosine <a, b> / (|a| |b|) over the last two axes (NaN when a is zero)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  dot = np.sum(a * b, axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return dot / (np.linalg.norm(a, axis=(-2, -1)) * np.linalg.norm(b, axis=(-2, -1)))


def bayes_weights(params: synthetic.SyntheticParams) -> np.ndarray:
  """W* = Lambda^{-1} M^T [D, C], Lambda = diag(synthetic.eigenvalues), M the class means: the
  weights of the Bayes-optimal (linear discriminant) classifier of the generating Gaussians,
  logit_c = mu_c^T Lambda^{-1} x - mu_c^T Lambda^{-1} mu_c / 2, without the class offsets a
  bias-free linear model cannot hold."""
  return (synthetic.class_means(params) / synthetic.eigenvalues(params)[None]).T


# ------------------------------------------------------------------------------------------------
# Reading a study.


def model_inputs(study, split: str) -> np.ndarray:
  """The split's inputs exactly as the model sees them (images normalised), [N, ...] float64."""
  arrays = study.data[split]
  n = len(arrays["label"])
  batch = data_lib.eval_batch_jit(data_lib.to_device(arrays), study.dataset,
                                  np.arange(n, dtype=np.int32), np.ones(n, np.float32))
  return np.asarray(batch[study.dataset.input_key], np.float64)


def _check_linear(study) -> None:
  for stage in ("teacher", "students"):
    for g in study.stage(stage).groups:
      if g.model.name != "linear":
        raise ValueError(f"the eigen_trajectory and gradient_denoising analyses need the "
                         f"`linear` model; the {stage} stage has {g.model.label}")


def _stage_params(stage, stage_engines, states) -> tuple[np.ndarray, np.ndarray | None]:
  """(kernel [R, D, C], bias [R, C] or None) of a stage's states, in stage order."""
  kernel = bias = None
  for e in stage_engines:
    head = states[e.group.key].params["head"]
    k = np.asarray(head["kernel"], np.float64)
    if kernel is None:
      kernel = np.zeros((len(stage.replicas),) + k.shape[1:])
      bias = np.zeros((len(stage.replicas), k.shape[-1])) if "bias" in head else None
    kernel[list(e.group.indices)] = k
    if bias is not None:
      bias[list(e.group.indices)] = np.asarray(head["bias"], np.float64)
  return kernel, bias


# The last trajectories read, so that the two sections of one analysis restore every checkpoint
# once (about 0.1 s a step); keyed by the checkpoint directory and its steps' modification times.
_CACHE: dict[tuple, dict[str, np.ndarray]] = {}


def trajectory(study, workdir: str, stage: str) -> dict[str, np.ndarray]:
  """Every saved step of a stage: {"steps" [S+1] (0 first: the initial weights, recomputed from
  the replicas' init streams), "kernel" [S+1, R, D, C], "bias" [S+1, R, C] (zeros without a
  bias)}."""
  directory = workdir_lib.join(train.stage_dir(workdir, stage), "checkpoints")
  steps = checkpoint_lib.finished_steps(directory)
  # epath's stat: also on an object store (gs://), where os.stat cannot look.
  key = (workdir_lib.absolute(directory), tuple(
      (s, epath.Path(workdir_lib.join(directory, str(s))).stat().mtime) for s in steps))
  if key not in _CACHE:
    if len(_CACHE) >= 2:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = _read_trajectory(study, workdir, stage, steps)
  return _CACHE[key]


def _read_trajectory(study, workdir: str, stage: str, steps) -> dict[str, np.ndarray]:
  spec_stage = study.stage(stage)
  stage_engines = train.engines(study, stage)
  initial = _stage_params(spec_stage, stage_engines,
                          {e.group.key: e.init_state() for e in stage_engines})
  ckpt = train.checkpoints(workdir, stage, read_only=True)
  target = train.abstract_states(stage_engines)
  kernels, biases = [initial[0]], [initial[1]]
  for step in steps:
    states, _ = ckpt.restore(target, step)
    kernel, bias = _stage_params(spec_stage, stage_engines, states)
    kernels.append(kernel)
    biases.append(bias)
  ckpt.close()
  zeros = np.zeros(initial[0].shape[:1] + initial[0].shape[-1:])
  return {"steps": np.array([0] + list(steps), np.int64), "kernel": np.stack(kernels),
          "bias": np.stack([zeros if b is None else b for b in biases])}


def _roles(context) -> list[tuple[str, str, list[int]]]:
  """(label, stage, replica indices) per teacher and per student group with included replicas."""
  roles = [(f"teacher {t.index}", "teacher", [t.index])
           for t in context.study.teacher.replicas if not context.teacher_diverged[t.index]]
  roles += [(g.display, "students", list(g.included)) for g in context.groups if g.included]
  return roles


# ------------------------------------------------------------------------------------------------
# eigen_trajectory


def bands(num: int) -> tuple[slice, slice]:
  """The top and bottom quarters (at least one direction each) of `num` eigendirections."""
  quarter = max(1, num // 4)
  return slice(0, quarter), slice(num - quarter, num)


def _band_mean(values: np.ndarray) -> str:
  return f"{np.nanmean(values):.3f}" if np.isfinite(values).any() else "n/a"


@sections.register("eigen_trajectory")
def eigen_trajectory(context: sections.Context) -> sections.Section:
  """Distillation exaggerates gradient descent's bias toward the top eigendirections
  (arXiv 2301.12923, Sec. 4, Theorem 4.1), measured on every checkpoint.

  Eigendirections v_i: `second_moment_eigh` of the train inputs (the matrix that sets GD's
  per-direction rates for this model; for synthetic data it is the known within-class spectrum
  plus the class means' low-rank part). Per model m and step t, A_m(t)_i = `eigen_projections`;
  relative progress r_m(t)_i = A_m(t)_i / A_teacher(T)_i, T = the teacher's last step, teacher =
  the model's own. Per model: r at step T (`relative_at_teacher_stop`, 1 for the teacher), at its
  last step (`relative_final`), and `steps_to_50` / `steps_to_90` (`first_reach` of 0.5 and
  0.9). The theorem's prediction: the distilled student keeps up with the teacher along the top
  directions and lags along the bottom ones (r at T near 1 for small i, below 1 for large i).
  """
  study = context.study
  _check_linear(study)
  values, vectors = second_moment_eigh(model_inputs(study, "train"))
  dim = len(values)
  traj = {s: trajectory(study, context.workdir, s) for s in ("teacher", "students")}
  proj = {s: eigen_projections(t["kernel"], t["kernel"][0], vectors) for s, t in traj.items()}
  teacher_stop = int(traj["teacher"]["steps"][-1])
  reference = proj["teacher"][-1]  # [T, D]
  compared = context.preds.compared_teacher
  models = []
  for label, stage, indices in _roles(context):
    for r in indices:
      ref = reference[r if stage == "teacher" else compared[r]]
      steps, curve = traj[stage]["steps"], proj[stage][:, r]
      with np.errstate(invalid="ignore", divide="ignore"):
        relative = curve / ref[None]
      at_stop = np.flatnonzero(steps == teacher_stop)
      models.append({
          "role": label, "stage": stage, "index": int(r),
          "teacher": int(r if stage == "teacher" else compared[r]),
          "relative_at_teacher_stop": (relative[at_stop[0]] if at_stop.size else
                                       np.full(dim, np.nan)).tolist(),
          "relative_final": relative[-1].tolist(),
          **{f"steps_to_{int(100 * f)}": first_reach(steps, curve, ref, f) for f in FRACTIONS}})
  known = None
  if study.dataset.name.startswith("synthetic"):
    known = synthetic.eigenvalues(synthetic.parse(study.dataset.name.partition(":")[2])).tolist()
  results = {"eigenvalues": values.tolist(), "known_within_class_spectrum": known,
             "teacher_stop_step": teacher_stop,
             "reference": "the model's own teacher's projection at its last step",
             "models": models}
  np.savez(os.path.join(os.path.dirname(context.plot_dir), "eigen_trajectory.npz"),
           eigenvalues=values, eigenvectors=vectors,
           teacher_steps=traj["teacher"]["steps"], teacher_projections=proj["teacher"],
           student_steps=traj["students"]["steps"], student_projections=proj["students"])
  _eigen_plot(os.path.join(context.plot_dir, "eigen_trajectory.png"), context, traj, proj,
              reference, results)
  return sections.Section(results=results, markdown=_eigen_markdown(results))


def _role_curve(context, traj, proj, reference, stage, indices):
  compared = context.preds.compared_teacher
  refs = np.stack([reference[r if stage == "teacher" else compared[r]] for r in indices])
  with np.errstate(invalid="ignore", divide="ignore"):
    return traj[stage]["steps"], np.mean(proj[stage][:, indices] / refs[None], axis=1)


def _eigen_plot(path, context, traj, proj, reference, results) -> None:
  dim = len(results["eigenvalues"])
  shown = sorted({0, dim // 4, dim // 2, dim - 1})
  fig = Figure(figsize=(12, 4.4), layout="constrained")
  left, right = fig.subplots(1, 2)
  styles = ["-", "--", ":", "-."]
  for k, (label, stage, indices) in enumerate(_roles(context)):
    steps, rel = _role_curve(context, traj, proj, reference, stage, indices)
    for c, i in enumerate(shown):
      left.plot(steps, rel[:, i], color=plots._color(c), ls=styles[k % len(styles)],
                label=f"{label}, v{i + 1}" if k == 0 or c == 0 else None)
    stop = np.flatnonzero(steps == results["teacher_stop_step"])
    x = np.arange(1, dim + 1)
    if stage != "teacher" and stop.size:
      right.plot(x, rel[stop[0]], color=plots._color(k), marker="o", ms=3, ls="-",
                 label=f"{label} at the teacher's stop")
    right.plot(x, rel[-1], color=plots._color(k), ls=styles[k % len(styles)],
               label=f"{label} at its end")
  left.axvline(results["teacher_stop_step"], color="gray", lw=1)
  left.axhline(1.0, color="black", lw=1)
  left.set_xlabel("step")
  left.set_ylabel("projection / teacher's final projection")
  left.set_title("Per eigendirection v_i (colour), per model (line style)", fontsize=9)
  left.legend(fontsize=7)
  right.axhline(1.0, color="black", lw=1)
  right.set_xlabel("eigendirection i (1 = largest eigenvalue)")
  right.set_ylabel("projection / teacher's final projection")
  right.set_title("Progress along each eigendirection", fontsize=9)
  right.legend(fontsize=7)
  for ax in (left, right):
    ax.grid(alpha=0.3)
  fig.suptitle("Weights along the data's eigendirections (arXiv 2301.12923, Theorem 4.1)",
               fontsize=10)
  plots._save(fig, path)


def _fmt_steps(steps: list) -> str:
  reached = [s for s in steps if s is not None]
  if not reached:
    return f"never ({len(steps)} of {len(steps)})"
  text = f"{int(np.median(reached))}"
  return text + (f" ({len(steps) - len(reached)} never)" if len(reached) < len(steps) else "")


def _eigen_markdown(results: dict) -> str:
  dim = len(results["eigenvalues"])
  top, bottom = bands(dim)
  out = ["## Weights along the data's eigendirections (arXiv 2301.12923, Theorem 4.1)", "",
         f"The {dim} eigendirections of the train inputs' second-moment matrix X^T X / N "
         f"(eigenvalues {results['eigenvalues'][0]:.3g} .. {results['eigenvalues'][-1]:.3g}). "
         "For each model, its class-centred weight displacement from initialisation is projected "
         "on each direction and divided by its teacher's final projection (1 = where the "
         f"teacher stopped, at step {results['teacher_stop_step']}). Top = the "
         f"{top.stop - top.start} largest-eigenvalue directions, bottom = the "
         f"{bottom.stop - bottom.start} smallest. Theorem 4.1: the distilled student keeps up "
         "with the teacher along the top directions and lags along the bottom ones.", "",
         "| model | top: at the teacher's stop | bottom: at the teacher's stop | top: at the end "
         "| bottom: at the end | steps to 90%: top | steps to 90%: bottom |",
         "|---|---|---|---|---|---|---|"]
  for m in results["models"]:
    at, end = np.array(m["relative_at_teacher_stop"]), np.array(m["relative_final"])
    cells = [_band_mean(at[top]), _band_mean(at[bottom]), _band_mean(end[top]),
             _band_mean(end[bottom]), _fmt_steps(m["steps_to_90"][top]),
             _fmt_steps(m["steps_to_90"][bottom])]
    name = m["role"] + (f" (replica {m['index']})" if m["stage"] == "students" else "")
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  out += ["", "Cells: mean of the relative projection over the band; steps: median over the "
          "band's directions of the first checkpoint step at which the projection reaches 90% of "
          "the teacher's final one (directions that never do are counted apart). Curves: "
          "`eigen_trajectory.npz`.", "",
          "![Weights along the eigendirections](plots/eigen_trajectory.png)"]
  return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# gradient_denoising


def synthetic_params(study) -> synthetic.SyntheticParams:
  name = study.dataset.name
  if not name.startswith("synthetic"):
    raise ValueError(f"the gradient_denoising analysis needs kdjax's synthetic data, whose "
                     f"class means are known; the dataset is {name}")
  return synthetic.parse(name.partition(":")[2])


@sections.register("gradient_denoising")
def gradient_denoising(context: sections.Context) -> sections.Section:
  """Do the student's updates point closer to the ground truth than one-hot ones (arXiv
  2301.12923, Sec. 4, Theorem 4.3: distillation denoises the one-hot gradient when classes are
  similar)? kdjax's measurement, on every checkpoint of each model:

    update alignment   cos(U_k P, W* P), U_k = W(s_k) - W(s_{k-1}) the update between saved
                       steps (= -lr x the summed gradients), W* = `bayes_weights`, P =
                       `class_centering`; `within`: the same with Q = `within_superclass_centering`
                       in place of P (the part of the update that separates similar classes);
    displacement       cos((W(s_k) - W_0) P, W* P);
    accuracy           eval accuracy of argmax(x W(s_k) + b) against the labels.

  Per model: the mean update alignment over its steps (all classes, within superclasses), the
  final displacement alignment and accuracy.
  """
  study = context.study
  _check_linear(study)
  params = synthetic_params(study)
  w_star = bayes_weights(params)
  p = class_centering(params.classes)
  q = within_superclass_centering(synthetic.superclass_of(params))
  x_test = model_inputs(study, "test").reshape(study.num_eval, -1)
  y_test = np.asarray(study.data["test"]["label"])
  curves, models = {}, []
  for stage in ("teacher", "students"):
    t = trajectory(study, context.workdir, stage)
    k = t["kernel"]
    updates = np.diff(k, axis=0)
    curves[stage] = {
        "steps": t["steps"],
        "update_alignment": cosine(updates @ p, w_star @ p),
        "update_alignment_within": cosine(updates @ q, w_star @ q),
        "displacement_alignment": cosine((k - k[:1]) @ p, w_star @ p),
        "accuracy": np.mean(np.argmax(np.einsum("nd,srdc->srnc", x_test, k) +
                                      t["bias"][:, :, None], -1) == y_test, axis=-1)}
  for label, stage, indices in _roles(context):
    c = curves[stage]
    for r in indices:
      models.append({
          "role": label, "stage": stage, "index": int(r),
          "mean_update_alignment": float(np.nanmean(c["update_alignment"][:, r])),
          "mean_update_alignment_within": float(np.nanmean(c["update_alignment_within"][:, r])),
          "final_displacement_alignment": float(c["displacement_alignment"][-1, r]),
          "final_accuracy": float(c["accuracy"][-1, r])})
  results = {"superclasses": params.superclasses, "classes": params.classes,
             "ground_truth": "W* = diag(1 / lambda) M^T (Bayes-optimal discriminant weights)",
             "models": models}
  np.savez(os.path.join(os.path.dirname(context.plot_dir), "gradient_denoising.npz"),
           w_star=w_star, **{f"{stage}_{name}": v for stage, c in curves.items()
                             for name, v in c.items()})
  _denoising_plot(os.path.join(context.plot_dir, "gradient_denoising.png"), context, curves)
  return sections.Section(results=results, markdown=_denoising_markdown(results))


def _denoising_plot(path, context, curves) -> None:
  fig = Figure(figsize=(13, 4.0), layout="constrained")
  axes = fig.subplots(1, 3)
  keys = (("update_alignment", "update . W* (all classes)"),
          ("update_alignment_within", "update . W* (within superclasses)"),
          ("accuracy", "eval accuracy"))
  for k, (label, stage, indices) in enumerate(_roles(context)):
    c = curves[stage]
    for ax, (key, title) in zip(axes, keys):
      values = np.nanmean(c[key][:, indices], axis=1)
      steps = c["steps"][1:] if key.startswith("update") else c["steps"]
      # The teacher is drawn wide underneath: siddo retraces it up to the teacher's stop.
      ax.plot(steps, values, color=plots._color(k), label=label,
              lw=4 if stage == "teacher" else 1.5, alpha=0.45 if stage == "teacher" else 1.0)
      ax.set_title(title, fontsize=9)
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("cosine")
  axes[-1].legend(fontsize=8)
  fig.suptitle("Alignment of the weight updates with the Bayes-optimal weights "
               "(arXiv 2301.12923, Theorem 4.3)", fontsize=10)
  plots._save(fig, path)


def _denoising_markdown(results: dict) -> str:
  out = ["## Gradient denoising under class similarity (arXiv 2301.12923, Theorem 4.3)", "",
         f"{results['classes']} classes in {results['superclasses']} superclass(es). Each "
         "model's update between saved steps (minus the learning rate times its gradients) is "
         "compared with the Bayes-optimal weights W* of the generating Gaussians by the cosine of "
         "their class-centred parts, over all classes and within superclasses (the part that "
         "separates similar classes). Theorem 4.3 predicts that distillation from the "
         "early-stopped teacher gives better-aligned updates than one-hot labels when classes "
         "are similar.", "",
         "| model | mean update alignment | within superclasses | final displacement alignment "
         "| final eval accuracy |", "|---|---|---|---|---|"]
  for m in results["models"]:
    name = m["role"] + (f" (replica {m['index']})" if m["stage"] == "students" else "")
    out.append(f"| {name} | {m['mean_update_alignment']:.3f} | "
               f"{m['mean_update_alignment_within']:.3f} | "
               f"{m['final_displacement_alignment']:.3f} | {100 * m['final_accuracy']:.1f}% |")
  out += ["", "![Update alignment](plots/gradient_denoising.png)"]
  return "\n".join(out)
