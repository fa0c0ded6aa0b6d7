"""What the on-policy trainers (TraceRL, VRPO on rollouts) share: their common settings, the task's prompts and
held-out check, the prompt order, and the reward metrics of a rollout."""

from __future__ import annotations

import functools
import os
import logging
import math
import random
from dataclasses import dataclass, field, fields, replace

import torch

from dlm_rl import distributed
from dlm_rl.checkpoint import CheckpointArguments, start_run
from dlm_rl.data.sources import DatasetArguments, PromptData, load_prompts, rename_task
from dlm_rl.guards import NonFiniteArguments
from dlm_rl.hub import HubArguments
from dlm_rl.models.lora import LoraArguments
from dlm_rl.run_log import ReportArguments
from dlm_rl.trainers.optimization import OptimizationArguments

logger = logging.getLogger(__name__)


@dataclass
class OnlineArguments(DatasetArguments, CheckpointArguments, ReportArguments, HubArguments, OptimizationArguments,
                      LoraArguments, NonFiniteArguments):
    """Settings of every trainer that learns from its own rollouts; every field can be a recipe key."""

    model: str = "testbed:addition3-base"
    """'testbed:NAME', 'tiny', 'smollm2', a saved model path, or a LLaDA / Dream / SDAR hub name."""
    trust_remote_code: bool = False
    """Needed for LLaDA, Dream and SDAR checkpoints (their modelling code ships with the weights)."""
    task: str | None = None
    """Deprecated: dataset_name (the same values)."""
    reward_funcs: list[str] = field(default_factory=lambda: ["rewards.math:accuracy"])
    """Rewards as 'module:function' or 'path/to/file.py:function'."""
    reward_weights: list[float] | None = None
    """One weight per reward (default 1 each)."""
    reward_timeout: float = 60.0
    """Seconds a custom reward may take per call; a call that takes longer is abandoned and its samples get no reward
    (they are left out of the update)."""
    max_reward_failures: int = 3
    """The run stops when a reward fails (times out, or raises on every sample) this many calls in a row."""
    constant_reward_patience: int = 5
    """Warn when a reward gives every completion of a step the same score this many steps in a row (0: off)."""
    constant_reward_error: bool = False
    """Stop the run instead of warning about a constant reward."""
    use_lora: bool = True
    """Train a LoRA adapter (the default) instead of all weights."""
    num_generations: int = 8
    """Samples per prompt (compared with each other: advantages, preference pairs)."""
    prompts_per_step: int = 16
    """Prompts per rollout step."""
    max_steps: int = 50
    """Rollout steps."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    gen_length: int | None = None
    """Response canvas; the task's response length by default."""
    block_length: int | None = None
    """Sampler block length (default: the whole response)."""
    threshold: float | None = 0.9
    """Fast-dLLM threshold decoding for rollouts (None: one token per step)."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    rollout_actors: int = 0
    """Generate on this many Ray actors (`RayEngine`: each builds its own copy of the policy, one GPU each when the
    cluster has GPUs, and gets the trained weights after every update) instead of in the trainer's process (0).
    Under torchrun / accelerate the main process drives the actors and sends each rank its share."""
    ray_address: str | None = None
    """With rollout_actors: the Ray cluster to join ('auto', 'ray://HEAD:10001'); unset starts a local instance."""
    rollout_server: str | None = None
    """Generate on a server instead (`ServedEngine`): the OpenAI API root of one serving the policy's base weights as
    `base` with runtime LoRA loading (scripts/serve_vllm.sh, docs/serving.md); the trained adapter is loaded into it
    after every update. Needs use_lora, and a method that re-masks completions itself (the server records no
    decoding steps). Its API key, if any, is read from DLM_RL_ROLLOUT_API_KEY."""
    eval_steps: int = 10
    """Greedy accuracy on the held-out prompts every this many steps (and before and after)."""
    fsdp: bool = False
    """Under torchrun / accelerate, shard the trained weights, their gradients and AdamW's state over the processes
    (FSDP2: `dlm_rl.sharding`) instead of holding them whole on each (data parallel)."""
    eval_batch_size: int = 32
    """Held-out prompts sampled at once: the check's memory is this many canvases' logits (batch × length ×
    vocabulary), not eval_size's."""
    rollout_batch_size: int | None = None
    """Rollout rows (prompts × num_generations) sampled at once, whole prompts per batch (at least one); unset: the
    step's share in one batch. Each batch draws its own seeded noise, so changing it changes the samples."""
    output_dir: str = "runs/online"
    """Where metrics.jsonl, TensorBoard logs, completions.jsonl, curves.png and the final model go."""
    seed: int = 0
    """Seed for prompt order, rollouts and the LoRA initialisation."""

    def __post_init__(self):
        rename_task(self)
        super().__post_init__()
        if isinstance(self.reward_funcs, str) or not self.reward_funcs:
            raise ValueError(f"reward_funcs must be a non-empty list of 'module:function' references, got "
                             f"{self.reward_funcs!r}")
        require_positive(self, "max_steps", "prompts_per_step", "eval_steps", "gen_length", "block_length",
                         "eval_batch_size", "rollout_batch_size")
        require_range(self, learning_rate=(0, None), weight_decay=(0, None), temperature=(0, None),
                      constant_reward_patience=(0, None))
        if not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be positive and finite, got {self.max_grad_norm}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1] or null (one token per step), got {self.threshold}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2: a prompt's samples are compared with each other")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_funcs)} reward_funcs but {len(self.reward_weights)} reward_weights")
        if not 0 < self.reward_timeout < math.inf:
            raise ValueError(f"reward_timeout must be a positive number of seconds, got {self.reward_timeout!r}")
        if self.max_reward_failures < 1:
            raise ValueError(f"max_reward_failures must be at least 1, got {self.max_reward_failures!r}")
        if self.rollout_actors < 0:
            raise ValueError(f"rollout_actors must be 0 (generate in this process) or more, got {self.rollout_actors}")
        if self.rollout_server is not None:
            if self.rollout_actors:
                raise ValueError("give rollout_server or rollout_actors, not both")
            if not self.rollout_server.startswith(("http://", "https://")):
                raise ValueError("rollout_server must be a URL starting with http:// or https:// (the server's "
                                 "OpenAI API root)")
            if not self.use_lora:
                raise ValueError("rollout_server needs use_lora: true (the server takes the trained adapter, not the "
                                 "whole weights)")
            if distributed.world_size() > 1:
                raise ValueError("rollout_server runs in one training process for now")
        if self.fsdp and self.rollout_actors:
            raise ValueError("fsdp with rollout_actors is not supported yet: the actors would need the whole weights "
                             "gathered from the shards at every sync; generate in the trainer's processes")
        if not self.generated or self.dataset_name.startswith("reasoning_gym:"):
            if self.gen_length is None:
                raise ValueError(f"dataset {self.dataset_path or self.dataset_name!r} needs gen_length (the response "
                                 "canvas; only testbed tasks know theirs)")


def require_positive(config, *names: str) -> None:
    """Refuse a setting among `names` that is not a whole number of at least 1 (None passes: "not set")."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


def require_range(config, **bounds: tuple[float | None, float | None]) -> None:
    """Refuse a number outside its closed range `name=(low, high)` (None: unbounded on that side); NaN and inf are
    outside every range."""
    for name, (low, high) in bounds.items():
        value = getattr(config, name)
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            allowed = f"at least {low} and finite" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{name} must be {allowed}, got {value!r}")


def load_task(config: OnlineArguments, train_dataset=None, eval_dataset=None) -> PromptData:
    """The training and held-out prompts: the given datasets, else those `config` names (`dlm_rl.data.sources`)."""
    return load_prompts(config, config.seed, train_dataset, eval_dataset)


def rollout_engine(config: OnlineArguments, model, rewards):
    """The step's sampler of rollouts: a `LocalEngine` on the trainer's `model` in every process (each rank samples
    its own share), or with `rollout_actors` a `RayEngine` in the main process only (None elsewhere), whose actors
    build the policy with `rollout_policy`; their weights are their own until they are synced."""
    from dlm_rl.rollout import LocalEngine, RayEngine, ServedEngine

    rows = config.rollout_batch_size or config.prompts_per_step * config.num_generations
    if config.rollout_server is not None:
        return ServedEngine(config.rollout_server, model.tokenizer, api_key=os.environ.get("DLM_RL_ROLLOUT_API_KEY"),
                            rows_per_chunk=rows, seed=config.seed, rewards=rewards)
    if not config.rollout_actors:
        return LocalEngine(model, rows_per_chunk=rows, seed=config.seed + distributed.rank(), rewards=rewards)
    if not distributed.is_main():
        return None
    return RayEngine(functools.partial(rollout_policy, config), num_actors=config.rollout_actors,
                     address=config.ray_address, rows_per_chunk=_prompts_per_chunk(config) * config.num_generations,
                     seed=config.seed, rewards=rewards)


def _prompts_per_chunk(config: OnlineArguments) -> int:
    """The largest chunk (in prompts) that divides every rank's share, so that no chunk straddles two ranks, that
    still gives every actor a chunk when there are enough prompts, and that holds at most rollout_batch_size rows."""
    n, bounds = config.prompts_per_step, distributed.share_bounds(config.prompts_per_step)
    common = math.gcd(*(end - start for start, end in zip(bounds, bounds[1:])))
    fitting = [d for d in range(1, common + 1) if common % d == 0 and -(-n // d) >= config.rollout_actors
               and (config.rollout_batch_size is None or d * config.num_generations <= config.rollout_batch_size)]
    return max(fitting, default=1)


def rollout_share(engine, rows: list[dict], config: OnlineArguments, sampler) -> list:
    """This process's share of a step's rollouts: sampled here (`LocalEngine`), or by the main process's
    `RayEngine` for every rank at once and sent to each rank (chunks never straddle two ranks' shares)."""
    share = distributed.share(rows)  # refuses fewer prompts than processes
    if not config.rollout_actors:
        return engine.generate(share, config.num_generations, sampler)

    def shares() -> list:  # on rank 0
        trajectories = engine.generate(rows, config.num_generations, sampler)
        if distributed.world_size() > 1:
            trajectories = _on_cpu(trajectories)
        bounds = distributed.share_bounds(len(rows))
        return [[t for t in trajectories if start <= t.prompt_index[0] < end]
                for start, end in zip(bounds, bounds[1:])]

    return distributed.scatter_from_main(shares)


def rollout_policy(config: OnlineArguments):
    """The policy as a rollout actor builds it: the trainer's model with its LoRA structure, not yet its weights."""
    from dlm_rl.models.lora import add_lora
    from dlm_rl.model_spec import resolve_model

    model = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
    if config.use_lora:
        add_lora(model, config)
    return model


def start_online_run(config: OnlineArguments, state: dict, main: bool, engine, model):
    """`start_run` (restore when resuming; open the log), then send rollout actors, which built their own copies,
    every weight once, and a rollout server the adapter (a resumed run's is trained). A refused start closes the
    engine, so that no actor is left behind."""
    try:
        started = start_run(config, state, main)
        if engine is not None and (config.rollout_actors or config.rollout_server):
            engine.sync_weights(model, full=bool(config.rollout_actors))
        return started
    except BaseException:
        if engine is not None:
            engine.close()
        raise


def sync_rollout_weights(engine, model, config: OnlineArguments) -> None:
    """Give the rollout engine (if this process has one) the trained weights: the adapter with LoRA (the base
    weights do not change), every weight in full fine-tuning."""
    if engine is not None:
        engine.sync_weights(model, full=not config.use_lora)


class PromptStream:
    """Batches of training rows in a seeded order, reshuffled at each pass; its state is the data position."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        if batch_size > len(rows):
            raise ValueError(f"{batch_size} prompts per step but the task has only {len(rows)} training prompts")
        self.rows, self.batch_size = list(rows), batch_size
        self.order = random.Random(seed)
        self.permutation = list(range(len(self.rows)))
        self.position = len(self.rows)

    def next(self) -> list[dict]:
        if self.position + self.batch_size > len(self.rows):
            self.order.shuffle(self.permutation)
            self.position = 0
        batch = [self.rows[i] for i in self.permutation[self.position : self.position + self.batch_size]]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"random": self.order.getstate(), "permutation": list(self.permutation), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if len(state["permutation"]) != len(self.rows):
            raise ValueError(f"the saved data order covers {len(state['permutation'])} rows but this run has "
                             f"{len(self.rows)}; resume with the data it was saved with")
        self.order.setstate(state["random"])
        self.permutation, self.position = list(state["permutation"]), state["position"]


def held_out_metrics(model, rows, scorer: str | None, gen_length: int, config: OnlineArguments, rewards) -> dict:
    """Greedy accuracy on the held-out prompts (by the dataset's scorer, when it has one) and the rewards' means
    there, eval_batch_size prompts at a time."""
    from dlm_rl.evaluation import evaluate

    result = evaluate(model, rows, scorer, gen_length=gen_length, samples=0, progress=False,
                      batch_size=config.eval_batch_size, sampler={"block_length": config.block_length},
                      rewards=rewards)
    model.train()
    metrics = {f"eval/reward/{name}": value for name, value in result["rewards"].items()}
    if "greedy_accuracy" in result:
        metrics["eval/greedy_accuracy"] = result["greedy_accuracy"]
    logger.info("held-out %s", ", ".join(f"{name.removeprefix('eval/')} {value:.3f}"
                                         for name, value in sorted(metrics.items())))
    return metrics


def check_prompts_fit(model, data: PromptData) -> None:
    """Refuse conversations for a tokenizer without a chat template, before any sampling."""
    from dlm_rl.data.sources import is_conversational

    if getattr(model.tokenizer, "chat_template", None) is None and (
            is_conversational(data.train) or is_conversational(data.held_out)):
        raise ValueError("the prompts are conversations (chat, system_prompt, or chat-message rows) but the model's "
                         "tokenizer has no chat template; use text prompts (prompt_template) or an instruct model")


def reward_metrics(trajectories) -> dict:
    """Mean of each reward over a rollout, mean NFE, failed rewards and the truncated fraction."""
    names = [n for n in trajectories[0].rewards if n not in ("errors",)]
    metrics = {}
    for name in names:
        values = [v for t in trajectories for v in t.rewards[name] if v is not None]
        metrics[f"reward/{name}"] = sum(values) / max(1, len(values))
    metrics["nfe"] = float(torch.cat([t.nfe.double() for t in trajectories]).mean())
    metrics["reward_errors"] = sum(e is not None for t in trajectories for e in t.rewards["errors"])
    metrics["truncated_fraction"] = sum(r == "length" for t in trajectories for r in t.finish_reason) / sum(
        len(t) for t in trajectories)
    return metrics


def gather_rollout(trajectories) -> list | None:
    """Every rank's trajectories, on rank 0 (for the reward metrics and completions.jsonl); None on the others.
    In one process: `trajectories` as they are."""
    if distributed.world_size() == 1:
        return trajectories
    return distributed.gather(_on_cpu(trajectories))


def _on_cpu(trajectories) -> list:
    """The trajectories with their tensors on the CPU, to send to another process."""
    return [replace(t, **{f.name: getattr(t, f.name).cpu() for f in fields(t)
                          if isinstance(getattr(t, f.name), torch.Tensor)}) for t in trajectories]
