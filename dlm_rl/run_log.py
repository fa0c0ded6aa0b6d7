"""A training run's records in its output directory: `metrics.jsonl` (one line per step), TensorBoard scalars
(`tensorboard/`), `completions.jsonl` (every sampled completion with its rewards) and, at the end, `curve.png`;
`plot_curves` also draws the panels of `dlm-rl plot`."""

from __future__ import annotations

import json
import logging
import math
import os

logger = logging.getLogger(__name__)


class RunLog:
    """A new run's records, or with `resume_step` a resumed run's: the lines and TensorBoard events after that
    step (written before the run was killed) are dropped and the files appended to."""

    def __init__(self, output_dir: str, tensorboard: bool = True, resume_step: int | None = None):
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        paths = [os.path.join(output_dir, name) for name in ("metrics.jsonl", "completions.jsonl")]
        if resume_step is not None:
            for path in paths:
                _drop_after(path, resume_step)
        self.metrics, self.completions = (open(path, "w" if resume_step is None else "a") for path in paths)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge)

    def log(self, line: dict) -> None:
        """Append a metrics line (it must have "step"); numbers also go to TensorBoard."""
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for name, value in line.items():
                if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(name, value, line["step"])
            self.writer.flush()

    def log_completions(self, step: int, trajectories) -> None:
        for t in trajectories:
            for i, text in enumerate(t.completions):
                rewards = {name: values[i] for name, values in t.rewards.items()}
                record = {"step": step, "prompt": t.rows[i]["prompt"], "completion": text,
                          "finish_reason": t.finish_reason[i], **rewards}
                self.completions.write(json.dumps(record) + "\n")
        self.completions.flush()

    def close(self, curve: tuple[str, ...] = ("reward/total", "eval/greedy_accuracy")) -> None:
        """Close the files, draw `curve.png` of the named metrics against the step, and log each held-out metric's
        first and last values and where the run's files are."""
        self.metrics.close()
        self.completions.close()
        if self.writer is not None:
            self.writer.close()
        try:
            plot_curves(os.path.join(self.output_dir, "metrics.jsonl"), os.path.join(self.output_dir, "curve.png"),
                        {"": curve})
        except Exception as error:  # a missing plot must not cost the run
            logger.warning("could not draw the curve: %s", error)
        for text in summary(os.path.join(self.output_dir, "metrics.jsonl"), curve):
            logger.info(text)
        for name in ("final", "curve.png", "completions.jsonl", "metrics.jsonl"):
            path = os.path.join(self.output_dir, name)
            if os.path.isdir(path) or (os.path.isfile(path) and os.path.getsize(path)):  # DiDi logs no completions
                logger.info("%-17s %s", name, path)


def _drop_after(path: str, step: int) -> None:
    """Keep the lines of a JSON-lines log up to `step` (a line cut short by the kill is dropped too)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line.rstrip("\n") + "\n")
            except (json.JSONDecodeError, KeyError):
                continue
    with open(path, "w") as f:
        f.writelines(kept)


def summary(metrics_path: str, names: tuple[str, ...]) -> list[str]:
    """One line per held-out metric (`eval/...`) among `names`: its first and last logged values and steps."""
    with open(metrics_path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    texts = []
    for name in names:
        points = [(line["step"], line[name]) for line in lines if isinstance(line.get(name), (int, float))]
        if name.startswith("eval/") and len(points) >= 2:
            (first_step, first), (last_step, last) = points[0], points[-1]
            texts.append(f"{name}: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step} "
                         f"({last - first:+.4f})")
    return texts


# What `dlm-rl plot` draws: panel title -> metrics; a name ending in "/" stands for every metric under it.
PANELS = {
    "reward": ("reward/", "reward"),
    "accuracy": ("eval/greedy_accuracy", "implicit_accuracy", "eval/validity"),
    "KL": ("kl",),
    "NFE": ("nfe",),
    "time per step (s)": ("time/",),
    "loss": ("loss", "value_loss", "discriminator_loss"),
    "guards": ("truncated_fraction", "guard/"),
}


def plot_curves(metrics_path: str, png_path: str, panels: dict[str, tuple[str, ...]] = PANELS) -> list[str]:
    """Draw each panel whose metrics the run logged against the step, one axis per panel, into `png_path`; returns
    the titles of the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    logged = list(dict.fromkeys(name for line in lines for name in line))  # first-seen order
    drawn = {}
    for title, wanted in panels.items():
        names = [n for w in wanted for n in logged if n == w or (w.endswith("/") and n.startswith(w))]
        if names:
            drawn[title] = list(dict.fromkeys(names))
    if not drawn:
        raise ValueError(f"{metrics_path} logs none of the metrics {sorted({n for w in panels.values() for n in w})}")
    columns = min(2, len(drawn))
    rows = math.ceil(len(drawn) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4 * rows), squeeze=False)
    for axis, (title, names) in zip(axes.flat, drawn.items()):
        for name in names:
            points = [(line["step"], line[name]) for line in lines if isinstance(line.get(name), (int, float))]
            axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    for axis in axes.flat[len(drawn):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return list(drawn)
