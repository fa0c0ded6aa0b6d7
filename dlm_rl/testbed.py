"""The tiny testbed: tasks with exactly checkable answers and the tiny base models trained on them.

`build(name)` trains a checkpoint with the MDM trainer, deterministically (fixed seeds, fixed step count),
evaluates it on held-out problems (greedy, unless the corpus has one prompt) and caches both under $DLM_RL_CACHE
(default ~/.cache/dlm-rl), with the package versions and CPU it was trained with; a cached checkpoint whose recipe
is unchanged is not rebuilt.

The same seeds do not give the same weights on every CPU (its floating-point paths differ), and a checkpoint stopped
by a validation rule can stop hundreds of steps apart. So the demo's base checkpoint ships with the package
(`SHIPPED`, a few MB, with its build metadata and checksums): `testbed:addition3-base` is the same model on every
machine, and needs no build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from dlm_rl.checkpoint import file_sha256
from dlm_rl.data import tasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    generator: str
    """Function of dlm_rl.data.tasks that makes the problems; also the name `tasks.score` dispatches on."""
    kwargs: dict = field(default_factory=dict)
    response_length: int = 8
    """Canvas length: the longest completion plus at least one EOS."""

    def dataset(self, split: str, n: int, seed: int = 0):
        return getattr(tasks, self.generator)(n, split=split, seed=seed, **self.kwargs)


TASKS = {
    "addition3": Task("addition", {"operands": 3, "digits": 2}, response_length=8),
    "chain": Task("chain", {"operands": 5, "digits": 1}, response_length=40),
    "code": Task("code", {"max_ops": 3}, response_length=32),
    # The chain problems on a 128-token canvas: long generations for sampler benchmarks (content ~35 tokens).
    "chain128": Task("chain", {"operands": 5, "digits": 1}, response_length=128),
    # Unconditional chains of 21 one-digit facts (126 characters) for distillation (DiDi-Instruct).
    "facts": Task("facts", {"count": 21}, response_length=128),
}


@dataclass(frozen=True)
class Checkpoint:
    """A tiny base model: which task, how long it trains, and what it is for."""

    task: str
    max_steps: int
    purpose: str
    """'sft': the MDM trainer should solve the task (cosine schedule, all steps); 'rl-base': partly trained, room
    left for RL (constant learning rate, stopped once validation greedy accuracy reaches `stop_at_accuracy`)."""
    stop_at_accuracy: float | None = None
    """rl-base: stop at the first check whose greedy accuracy on the validation problems is at least this."""
    check_every: int = 25
    """rl-base: steps between validation checks."""
    check_from: int = 0
    """rl-base: no checks before this step (checks cost forwards; early ones are known to fail)."""
    learning_rate: float = 1e-3
    batch_size: int = 128
    warmup_steps: int = 200
    train_size: int = 50000
    seed: int = 0
    init: str | None = None
    """Start from this testbed checkpoint (built first if needed) instead of random weights."""


CHECKPOINTS = {
    "addition3": Checkpoint("addition3", max_steps=3000, purpose="sft"),
    "addition3-base": Checkpoint("addition3", max_steps=2000, purpose="rl-base", stop_at_accuracy=0.4),
    "chain-base": Checkpoint("chain", max_steps=2000, purpose="rl-base", stop_at_accuracy=0.4),
    # The code task jumps from ~5% to ~98% greedy within 25 steps near step 440: check every 5 steps there.
    "code-base": Checkpoint(
        "code", max_steps=2000, purpose="rl-base", stop_at_accuracy=0.4, check_every=5, check_from=300,
        train_size=16000,
    ),
    # chain-base does not carry over to longer canvases (greedy 0% at 64 tokens): continue it on 128-token ones.
    # DiDi-Instruct's teacher: a masked diffusion LM of unconditional 128-token fact chains (1000 steps left it at
    # 52% valid facts at 1024 sampling steps; 2000 steps give a stronger teacher with a wider few-step gap).
    "facts-teacher": Checkpoint("facts", max_steps=2000, purpose="sft", batch_size=64),
    "chain128-base": Checkpoint(
        "chain128", max_steps=1000, purpose="rl-base", stop_at_accuracy=0.4, warmup_steps=0, init="chain-base"
    ),
}
# What `scripts/build_tiny_models.py` builds by default: every checkpoint but DiDi's teacher, over an hour of
# training on one core for 128-token texts that only distillation needs (`... build_tiny_models.py facts-teacher`).
STANDARD_CHECKPOINTS = [name for name in CHECKPOINTS if name != "facts-teacher"]
VALIDATION_SIZE = 128  # test-split problems for the stopping rule; excluded from the held-out evaluation
EVAL_SIZE = 256


def validation_draw(spec: Checkpoint):
    """The problems checkpoint `spec` is validated on while it trains (an 'rl-base' one stops on its greedy accuracy
    there): VALIDATION_SIZE test-split problems drawn with seed + 2."""
    return TASKS[spec.task].dataset("test", VALIDATION_SIZE, seed=spec.seed + 2)


def validation_problems(generator: str) -> frozenset[str]:
    """The `problem_key`s of every checkpoint's validation problems, for the tasks made by `generator` (tasks sharing a
    generator, such as `chain` and `chain128`, share their problems too)."""
    draws = {}  # one draw per (generator settings, seed): chain and chain128 draw the same problems
    for spec in CHECKPOINTS.values():
        task = TASKS[spec.task]
        if task.generator == generator:
            draws.setdefault((json.dumps(task.kwargs, sort_keys=True), spec.seed), spec)
    return frozenset(tasks.problem_key(row, generator) for spec in draws.values() for row in validation_draw(spec))


def held_out_problems(task_name: str, n: int, *, seed: int = 1):
    """`n` held-out problems of testbed task `task_name`: the first `n` of its test split drawn with `seed` that are
    not validation problems of a testbed checkpoint (`validation_problems`), so that the problems that chose a
    base checkpoint never score it. No training draw holds them: the split is a hash of the prompt (of the
    completion for `facts`). Raises a ValueError when the test split has fewer than `n` other problems."""
    task = TASKS[task_name]
    validation = validation_problems(task.generator)
    try:  # validation problems are test problems: n + len(validation) distinct ones hold n that are not
        drawn = task.dataset("test", n + len(validation), seed=seed)
    except ValueError as error:
        raise ValueError(f"dataset {task_name}: {n} held-out problems (eval_size) are more than its test split "
                         f"has besides the {len(validation)} validation problems of the testbed checkpoints; "
                         f"lower eval_size ({error})") from error
    keep = [i for i, row in enumerate(drawn) if tasks.problem_key(row, task.generator) not in validation][:n]
    return drawn.select(keep)


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
"""Where shipped checkpoints live: `NAME-KEY/` with the weights, tokenizer, metrics.json (how and where it was built)
and SHA256SUMS. `scripts/build_tiny_models.py NAME --ship` puts a built checkpoint here."""
CHECKSUMS = "SHA256SUMS"


def cache_root() -> str:
    return os.environ.get("DLM_RL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dlm-rl"))


def directory_name(name: str) -> str:
    """`NAME-KEY`: the key hashes the checkpoint's recipe, so a changed recipe never finds a stale checkpoint."""
    return f"{name}-{_key(CHECKPOINTS[name])}"


def shipped_checkpoint(name: str) -> str | None:
    """The shipped checkpoint `name` (its recipe unchanged since it was built), after checking every file against
    its checksum; None when none ships."""
    path = os.path.join(SHIPPED, directory_name(name))
    if not os.path.isfile(os.path.join(path, CHECKSUMS)):
        return None
    with open(os.path.join(path, CHECKSUMS)) as f:
        expected = dict(reversed(line.split(None, 1)) for line in f.read().splitlines() if line.strip())
    if set(expected) != set(os.listdir(path)) - {CHECKSUMS}:
        raise RuntimeError(f"the shipped checkpoint {path} does not hold exactly the files {CHECKSUMS} lists")
    for file, digest in expected.items():
        if file_sha256(os.path.join(path, file)) != digest:
            raise RuntimeError(f"the shipped checkpoint file {os.path.join(path, file)} does not match its checksum")
    return path


def ship(name: str) -> str:
    """Copy the built checkpoint `name` from the cache into the package (`SHIPPED`) with its checksums."""
    import shutil

    source = os.path.join(cache_root(), "testbed", directory_name(name))
    if not os.path.isfile(os.path.join(source, "metrics.json")):
        raise FileNotFoundError(f"build {name!r} first: python scripts/build_tiny_models.py {name}")
    target = os.path.join(SHIPPED, directory_name(name))
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("training_args.bin", "runs", "checkpoint-*"))
    files = sorted(f for f in os.listdir(target))
    with open(os.path.join(target, CHECKSUMS), "w") as f:
        f.writelines(f"{file_sha256(os.path.join(target, file))}  {file}\n" for file in files)
    return target


def _key(spec: Checkpoint) -> str:
    """Hash of what the checkpoint's recipe sets away from the defaults, so a new field with a default that
    keeps the old behaviour does not invalidate built checkpoints."""
    defaults = Checkpoint(spec.task, spec.max_steps, spec.purpose)
    changed = {k: v for k, v in asdict(spec).items() if v != getattr(defaults, k) or k in ("max_steps", "purpose")}
    if spec.init:
        changed["init"] = f"{spec.init}-{_key(CHECKPOINTS[spec.init])}"
    recipe = json.dumps({"checkpoint": changed, "task": asdict(TASKS[spec.task])}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:10]


def checkpoint(name: str) -> str:
    """Path of a testbed checkpoint: the shipped one when it ships, else the built one; raises with the build command
    when it is missing."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown testbed checkpoint {name!r}; choose one of {sorted(CHECKPOINTS)}")
    shipped = shipped_checkpoint(name)
    if shipped is not None:
        return shipped
    path = os.path.join(cache_root(), "testbed", directory_name(name))
    if not os.path.isfile(os.path.join(path, "metrics.json")):
        raise FileNotFoundError(
            f"testbed checkpoint {name!r} is not built yet: run `python scripts/build_tiny_models.py {name}`"
        )
    return path


def build(name: str, *, force: bool = False) -> dict:
    """Train (unless cached), evaluate and save checkpoint `name`; returns its metrics."""
    from dlm_rl.evaluation import evaluate
    from dlm_rl.models.loading import load
    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.trainers.mdm import MDMConfig, MDMTrainer

    spec = CHECKPOINTS[name]
    task = TASKS[spec.task]
    shipped = shipped_checkpoint(name)
    path = os.path.join(cache_root(), "testbed", directory_name(name))
    metrics_file = os.path.join(path, "metrics.json")
    for found in ([os.path.join(shipped, "metrics.json")] if shipped else []) + [metrics_file]:
        if os.path.isfile(found) and not force:
            with open(found) as f:
                return {**json.load(f), "cached": True}

    torch.manual_seed(spec.seed)
    if spec.init:
        build(spec.init)
        model = load(checkpoint(spec.init))
    else:
        model = tiny_model(seed=spec.seed)
    validation = validation_draw(spec)
    callbacks = []
    if spec.purpose == "rl-base":
        callbacks.append(_StopAtAccuracy(model, validation, task, spec))
    config = MDMConfig(
        output_dir=path,
        dataset_name=spec.task,
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type="cosine" if spec.purpose == "sft" else "constant_with_warmup",
        weight_decay=0.01,
        logging_steps=max(spec.max_steps // 10, 1),
        save_strategy="no",
        seed=spec.seed,
        data_seed=spec.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,  # builds run in parallel processes; the log lines below say what happens
    )
    train = task.dataset("train", spec.train_size, seed=spec.seed)
    trainer = MDMTrainer(model, config, train, task.response_length, callbacks=callbacks)
    logger.info(
        "%s: training up to %d steps on %s (%s); saving to %s", name, spec.max_steps, spec.task, spec.purpose, path
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model(path)

    seen = set(zip(validation["prompt"], validation["completion"]))
    held_out = task.dataset("test", EVAL_SIZE, seed=spec.seed + 1).filter(
        lambda row: (row["prompt"], row["completion"]) not in seen
    )
    samples = 8 if spec.purpose == "rl-base" else 0
    if len(set(held_out["prompt"])) > 1:
        logger.info("%s: trained in %.0f s; evaluating on %d held-out problems", name, train_seconds, len(held_out))
        result = evaluate(
            model, held_out, task.generator, gen_length=task.response_length, samples=samples, progress=False
        )
    else:  # an unconditional corpus (facts): every greedy decode would be the same text
        logger.info("%s: trained in %.0f s; one prompt only, so no greedy evaluation", name, train_seconds)
        result = {}
    metrics = {
        "name": name,
        "task": spec.task,
        "purpose": spec.purpose,
        "steps": trainer.state.global_step,
        "n_overlap_removed": EVAL_SIZE - len(held_out),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "environment": _environment(),
        **result,
    }
    with open(metrics_file, "w") as f:
        json.dump(metrics, f, indent=2)
    logger.info("%s: %s", name, {k: v for k, v in metrics.items() if k != "examples"})
    return {**metrics, "cached": False}


def _environment() -> dict:
    """What a rebuild needs to match bit for bit besides the code: the packages that train and the CPU."""
    from importlib.metadata import version

    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {**{name: version(name) for name in ("torch", "transformers", "accelerate", "datasets", "peft")},
            "cpu": cpu, "cuda": torch.cuda.is_available()}


class _StopAtAccuracy(TrainerCallback):
    """Stop training at the first check where greedy accuracy on the validation problems reaches the target."""

    def __init__(self, model, validation, task: Task, spec: Checkpoint):
        self.model, self.validation, self.task, self.spec = model, validation, task, spec

    def on_step_end(self, args, state, control, **kwargs):
        from dlm_rl.evaluation import evaluate

        if state.global_step < self.spec.check_from or state.global_step % self.spec.check_every:
            return
        accuracy = evaluate(
            self.model,
            self.validation,
            self.task.generator,
            gen_length=self.task.response_length,
            samples=0,
            progress=False,
        )["greedy_accuracy"]
        logger.info("step %d: validation greedy accuracy %.3f", state.global_step, accuracy)
        if accuracy >= self.spec.stop_at_accuracy:
            control.should_training_stop = True


def targets_met(metrics: dict) -> bool | None:
    """The testbed's promises: an 'sft' checkpoint solves ≥ 90% of held-out problems; an 'rl-base' one solves
    20–85% greedily and its pass@8 beats its pass@1 (temperature 1) by ≥ 15 points — room for RL. None for a
    checkpoint of a one-prompt corpus, which is not evaluated (its measure is `scripts/eval_distill.py`)."""
    if "greedy_accuracy" not in metrics:
        return None
    if metrics["purpose"] == "sft":
        return metrics["greedy_accuracy"] >= 0.90
    return 0.20 <= metrics["greedy_accuracy"] <= 0.85 and metrics["pass@8"] - metrics["pass@1"] >= 0.15
