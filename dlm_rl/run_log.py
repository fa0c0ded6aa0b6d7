"""A training run's records in its output directory: `metrics.jsonl` (one line per step), `completions.jsonl`
(every sampled completion with its finish reason, the weight version that sampled it and its rewards) and, at the
end, `curves.png`; the metrics also go to the `report_to` trackers (`ReportArguments`): TensorBoard scalars in
`tensorboard/`, a W&B run (its local files in `wandb/`), a Trackio run. `plot_curves` also draws the panels of
`dlm-rl plot`."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "trackio")
PLOT = "curves.png"


@dataclass
class ReportArguments:
    """Where the custom-loop trainers (TraceRL, VRPO, DiDi) report their metrics besides metrics.jsonl, which holds
    every step."""

    report_to: str | list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers the metrics go to, any of 'tensorboard' (output_dir/tensorboard), 'wandb' (its local files in
    output_dir/wandb; offline with WANDB_MODE=offline) and 'trackio' (a database in $TRACKIO_DIR, by default
    $HF_HOME/trackio, or a Space with TRACKIO_SPACE_ID); 'all': every one installed; 'none': none."""
    logging_steps: int = 1
    """Report every this many steps; a step with held-out metrics (eval/...) is always reported."""
    run_name: str | None = None
    """The run's name in W&B and Trackio (default: the last part of output_dir)."""
    project: str | None = None
    """The W&B and Trackio project (default: $WANDB_PROJECT, else 'dlm-rl')."""
    tensorboard: bool | None = None
    """Deprecated: report_to (`tensorboard: false` leaves 'tensorboard' out of it)."""

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):  # the config classes this one is mixed into
            super().__post_init__()
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        if unknown := [name for name in self.report_to if name not in (*TRACKERS, "all", "none")]:
            raise ValueError(f"report_to: unknown tracker {unknown[0]!r}; choose among {list(TRACKERS)}, or 'all' "
                             "or 'none'")
        if len(self.report_to) > 1 and {"all", "none"} & set(self.report_to):
            raise ValueError(f"report_to: 'all' and 'none' stand alone, got {self.report_to}")
        if self.report_to == ["all"]:
            self.report_to = [name for name in TRACKERS if importlib.util.find_spec(name)]
        elif self.report_to == ["none"]:
            self.report_to = []
        if self.tensorboard is not None:
            self.report_to = ["tensorboard"] * self.tensorboard + [x for x in self.report_to if x != "tensorboard"]
            logger.warning("`tensorboard` is deprecated and will be removed in the next release: use report_to "
                           "(tensorboard: %s gives report_to: %s)", str(self.tensorboard).lower(), self.report_to)
            self.tensorboard = None
        self.report_to = list(dict.fromkeys(self.report_to))
        for name in self.report_to:
            if importlib.util.find_spec(name) is None:
                raise ValueError(f"report_to: {name} is not installed: pip install {name} (or pip install "
                                 "'dlm-rl[trackers]' for wandb and trackio)")
        if isinstance(self.logging_steps, bool) or not isinstance(self.logging_steps, int) or self.logging_steps < 1:
            raise ValueError(f"logging_steps must be a whole number of at least 1, got {self.logging_steps!r}")


class RunLog:
    """A new run's records, or with `resume_step` a resumed run's: the lines and TensorBoard events after that
    step (written before the run was killed) are dropped and the files appended to; the W&B run this output_dir
    last held and the Trackio run of the same name are continued from the first step they do not have. Metrics
    lines go to the `report_to` trackers every `logging_steps` steps and whenever they hold held-out metrics."""

    def __init__(self, output_dir: str, report_to: Sequence[str] = ("tensorboard",), logging_steps: int = 1,
                 run_name: str | None = None, project: str | None = None, config: dict | None = None,
                 resume_step: int | None = None):
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir, self.logging_steps = output_dir, logging_steps
        paths = [os.path.join(output_dir, name) for name in ("metrics.jsonl", "completions.jsonl")]
        had = -1  # the last step the killed run logged
        if resume_step is not None:
            had = _drop_after(paths[0], resume_step)
            _drop_after(paths[1], resume_step)
        self.metrics, self.completions = (open(path, "w" if resume_step is None else "a") for path in paths)
        name = run_name or os.path.basename(os.path.abspath(output_dir))
        project = project or os.environ.get("WANDB_PROJECT", "dlm-rl")
        opened = {"tensorboard": lambda: _TensorBoard(output_dir, resume_step),
                  "wandb": lambda: _WandB(output_dir, name, project, config, had),
                  "trackio": lambda: _Trackio(name, project, config, had)}
        self.trackers = [opened[tracker]() for tracker in report_to]

    def log(self, line: dict) -> None:
        """Append a metrics line (it must have "step"); its finite numbers also go to the trackers when reported."""
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()
        if line["step"] % self.logging_steps and not any(name.startswith("eval/") for name in line):
            return
        numbers = {name: value for name, value in line.items()
                   if name != "step" and isinstance(value, (int, float)) and math.isfinite(value)}
        for tracker in self.trackers:
            tracker.log(numbers, line["step"])

    def log_completions(self, step: int, trajectories) -> None:
        for t in trajectories:
            for i, text in enumerate(t.completions):
                rewards = {name: values[i] for name, values in t.rewards.items()}
                record = {"step": step, "prompt": t.rows[i]["prompt"], "completion": text,
                          "finish_reason": t.finish_reason[i], "weight_version": t.weight_version, **rewards}
                self.completions.write(json.dumps(record) + "\n")
        self.completions.flush()

    def close(self, curve: tuple[str, ...] = ("reward/total", "eval/greedy_accuracy")) -> None:
        """Close the files and the trackers' runs, draw `curves.png` of the named metrics against the step, and log
        each held-out metric's first and last values and where the run's files are."""
        self.metrics.close()
        self.completions.close()
        for tracker in self.trackers:
            tracker.close()
        try:
            plot_curves(os.path.join(self.output_dir, "metrics.jsonl"), os.path.join(self.output_dir, PLOT),
                        {"": curve})
        except Exception as error:  # a missing plot must not cost the run
            logger.warning("could not draw the curve: %s", error)
        for text in summary(os.path.join(self.output_dir, "metrics.jsonl"), curve):
            logger.info(text)
        for name in ("final", PLOT, "completions.jsonl", "metrics.jsonl"):
            path = os.path.join(self.output_dir, name)
            if os.path.isdir(path) or (os.path.isfile(path) and os.path.getsize(path)):  # DiDi logs no completions
                logger.info("%-17s %s", name, path)


class _TensorBoard:
    """Scalars in output_dir/tensorboard; after a resume, the events past the checkpoint are dropped first."""

    def __init__(self, output_dir: str, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge)

    def log(self, numbers: dict, step: int) -> None:
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run with its local files in output_dir/wandb; after a resume (`had`: the last step the killed run
    logged, -1 for a new run) the one that output_dir last held, from the step after `had`."""

    def __init__(self, output_dir: str, name: str, project: str, config: dict | None, had: int):
        import wandb

        latest = os.path.join(output_dir, "wandb", "latest-run")  # a link to wandb/[offline-]run-DATE-ID
        run_id = os.path.realpath(latest).rsplit("-", 1)[-1] if had >= 0 and os.path.islink(latest) else None
        self.run = wandb.init(project=project, name=name, dir=output_dir, config=config, id=run_id,
                              resume="allow" if run_id else None)
        self.had = had

    def log(self, numbers: dict, step: int) -> None:
        if step > self.had:
            self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A Trackio run; after a resume (`had` as for `_WandB`) the project's latest run of that name, from the step
    after `had`."""

    def __init__(self, name: str, project: str, config: dict | None, had: int):
        import trackio

        self.trackio, self.had = trackio, had
        trackio.init(project=project, name=name, config=config, resume="allow" if had >= 0 else "never")

    def log(self, numbers: dict, step: int) -> None:
        if step > self.had:
            self.trackio.log(numbers, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _drop_after(path: str, step: int) -> int:
    """Keep the lines of a JSON-lines log up to `step` (a line cut short by the kill is dropped too); returns the
    last step it held (`step` when there is no log)."""
    if not os.path.exists(path):
        return step
    kept, last = [], step
    with open(path) as f:
        for line in f:
            try:
                logged = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError):
                continue
            last = max(last, logged)
            if logged <= step:
                kept.append(line.rstrip("\n") + "\n")
    with open(path, "w") as f:
        f.writelines(kept)
    return last


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
    "accuracy": ("eval/greedy_accuracy", "implicit_accuracy", "eval/implicit_accuracy", "eval/validity"),
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
