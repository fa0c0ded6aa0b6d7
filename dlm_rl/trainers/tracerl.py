"""TraceRL: reinforcement learning on the policy's own decoding trajectories (arXiv 2509.06949, DESIGN.md §4.3).

Each step: sample `num_generations` responses for `prompts_per_step` prompts with the rollout engine, score
them with the recipe's rewards, turn rewards into group z-score advantages (groups without variance are dropped;
a step left with nothing is skipped and logged), rebuild the visited states from `step_map` (`dlm_rl.rl.trace`),
recompute the old log-probs exactly, and take `inner_epochs` PPO-clip updates. Logs go to `output_dir`:
`metrics.jsonl` (one line per step) and `completions.jsonl` (every sampled completion with its rewards).

Not yet here (issue 6): the value model, the block-attention row layout, the diffu-GRPO / coupled /
random-masking baselines, TensorBoard and the curve PNG.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dlm_rl.models.lora import LoraArguments, add_lora
from dlm_rl.rl.advantages import group_advantages
from dlm_rl.rl.losses import ppo_trace_loss
from dlm_rl.rl.trace import trace_rows
from dlm_rl.sampling.config import SamplerConfig

logger = logging.getLogger(__name__)


@dataclass
class TraceRLConfig(LoraArguments):
    """TraceRL settings; every field can be a recipe key."""

    model: str = "testbed:addition3-base"
    """'testbed:NAME', 'tiny', 'smollm2', or a saved model path."""
    task: str = "addition3"
    """Testbed task giving the prompts and the columns the rewards read (e.g. 'answer', 'tests')."""
    train_size: int = 4096
    """Training prompts drawn from the task."""
    eval_size: int = 128
    """Held-out prompts for the greedy accuracy check."""
    reward_funcs: list[str] = field(default_factory=lambda: ["rewards.math:accuracy"])
    """Rewards as 'module:function' or 'path/to/file.py:function'."""
    reward_weights: list[float] | None = None
    """One weight per reward (default 1 each)."""
    use_lora: bool = True
    """Train a LoRA adapter (the default) instead of all weights."""
    num_generations: int = 8
    """Samples per prompt (the group for advantages)."""
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
    inner_epochs: int = 1
    """PPO epochs μ over each rollout's rows."""
    epsilon: float = 0.2
    """PPO clip range ε."""
    beta: float = 0.0
    """k3-KL weight."""
    kl_reference: str = "old"
    """KL anchor: 'old' (π_old, the rollout's weights) or 'reference' (the frozen base: the disabled LoRA adapter,
    so no second copy of the weights)."""
    shrink: int = 1
    """Trace shrinkage s: merge every s consecutive steps into one training row."""
    normaliser: str = "tokens"
    """Per-row loss normaliser: 'tokens' (trained tokens in the row) or 'length' (the response length)."""
    gen_length: int | None = None
    """Response canvas; the task's response length by default."""
    block_length: int | None = None
    """Sampler block length (default: the whole response)."""
    threshold: float | None = 0.9
    """Fast-dLLM threshold decoding for rollouts (None: one token per step)."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    eval_steps: int = 10
    """Greedy accuracy on the held-out prompts every this many steps (and before and after)."""
    output_dir: str = "runs/tracerl"
    """Where metrics.jsonl, completions.jsonl and the final model go."""
    seed: int = 0
    """Seed for prompt order, rollouts and the LoRA initialisation."""

    def __post_init__(self):
        if self.normaliser not in ("tokens", "length"):
            raise ValueError(f"normaliser must be 'tokens' or 'length', got {self.normaliser!r}")
        if self.kl_reference not in ("old", "reference"):
            raise ValueError(f"kl_reference must be 'old' or 'reference', got {self.kl_reference!r}")
        if self.kl_reference == "reference" and not self.use_lora:
            raise ValueError("kl_reference: 'reference' needs use_lora (the reference is the disabled adapter)")
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2: advantages compare samples of one prompt")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"{len(self.reward_funcs)} reward_funcs but {len(self.reward_weights)} reward_weights")


def run(config: TraceRLConfig) -> dict:
    """Train; returns the final metrics line (also the last line of metrics.jsonl)."""
    from dlm_rl.evaluation import evaluate
    from dlm_rl.models.resolve import resolve_model
    from dlm_rl.reward_functions import Rewards
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.testbed import TASKS

    if config.task not in TASKS:
        raise ValueError(f"unknown testbed task {config.task!r}; choose one of {sorted(TASKS)}")
    task = TASKS[config.task]
    torch.manual_seed(config.seed)
    rewards = Rewards(config.reward_funcs, config.reward_weights)  # bad references fail before any work
    model = resolve_model(config.model)
    if config.use_lora:
        add_lora(model, config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    gen_length = config.gen_length or task.response_length
    sampler = SamplerConfig(
        gen_length=gen_length,
        block_length=config.block_length,
        threshold=config.threshold,
        temperature=config.temperature,
    )
    engine = LocalEngine(model, rows_per_chunk=config.prompts_per_step * config.num_generations, seed=config.seed,
                         rewards=rewards)
    train = list(task.dataset("train", config.train_size, seed=config.seed))
    held_out = task.dataset("test", config.eval_size, seed=1)
    order = random.Random(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    metrics_file = open(os.path.join(config.output_dir, "metrics.jsonl"), "w")
    completions_file = open(os.path.join(config.output_dir, "completions.jsonl"), "w")

    def held_out_accuracy() -> float:
        result = evaluate(model, held_out, task.generator, gen_length=gen_length, samples=0, progress=False,
                          sampler={"block_length": config.block_length})
        model.train()
        return result["greedy_accuracy"]

    line = {"step": 0, "eval/greedy_accuracy": held_out_accuracy()}
    logger.info("step 0: held-out greedy accuracy %.3f", line["eval/greedy_accuracy"])
    metrics_file.write(json.dumps(line) + "\n")
    position, skipped = len(train), 0
    try:
        for step in tqdm(range(1, config.max_steps + 1), desc="TraceRL"):
            if position + config.prompts_per_step > len(train):
                order.shuffle(train)
                position = 0
            batch = train[position : position + config.prompts_per_step]
            position += config.prompts_per_step
            line = {"step": step}
            start = time.perf_counter()
            trajectories = engine.generate(batch, config.num_generations, sampler)
            line["time/generation_and_reward"] = time.perf_counter() - start
            _log_completions(completions_file, step, trajectories)
            start = time.perf_counter()
            line.update(_update(model, optimizer, parameters, trajectories, config, gen_length))
            line["time/training"] = time.perf_counter() - start
            if line.get("skipped"):
                skipped += 1
                logger.warning("step %d: every group had equal rewards; no update (%d skipped so far)", step, skipped)
            engine.sync_weights(model)
            line.update(_reward_metrics(trajectories))
            if step % config.eval_steps == 0 or step == config.max_steps:
                line["eval/greedy_accuracy"] = held_out_accuracy()
                logger.info("step %d: held-out greedy accuracy %.3f", step, line["eval/greedy_accuracy"])
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
    finally:
        metrics_file.close()
        completions_file.close()
        engine.close()
        model.save_pretrained(os.path.join(config.output_dir, "final"))
    return line


def _update(model, optimizer, parameters, trajectories, config: TraceRLConfig, gen_length: int) -> dict:
    """Advantages, trace rows and `inner_epochs` PPO steps over all of this rollout's rows."""
    chunks = []
    for trajectory in trajectories:
        totals = torch.tensor(trajectory.rewards["total"], dtype=torch.float64)
        advantages, keep = group_advantages(totals, torch.tensor(trajectory.prompt_index))
        if not keep.any():
            continue
        rows = trace_rows(trajectory, model.mask_token_id, s=config.shrink)
        kept = keep[rows.sample]
        if not kept.any():
            continue
        device = model.device
        inputs = (rows.input_ids[kept].to(device), rows.attention_mask[kept].to(device))
        targets, response = rows.targets[kept].to(device), rows.response_ids[kept].to(device)
        row_advantages = advantages[rows.sample[kept]].to(device, torch.float32)[:, None]
        with torch.no_grad():
            old = _log_probs(model, inputs, response)  # exact recompute: ratio 1 before the first update
            reference = reference_log_probs(model, inputs, response) if config.kl_reference == "reference" else None
        chunks.append((inputs, targets, response, row_advantages, old, reference))
    if not chunks:
        return {"skipped": 1}
    total_rows = sum(len(chunk[1]) for chunk in chunks)
    normaliser = "tokens" if config.normaliser == "tokens" else gen_length
    stats = {}
    model.train()
    for _ in range(config.inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for inputs, targets, response, row_advantages, old, reference in chunks:
            logp = _log_probs(model, inputs, response)
            loss, stats = ppo_trace_loss(logp, old, row_advantages, targets, epsilon=config.epsilon,
                                         beta=config.beta, logp_ref=reference, normaliser=normaliser)
            (loss * len(targets) / total_rows).backward()
            loss_sum += loss.item() * len(targets) / total_rows
        if not torch.isfinite(torch.tensor(loss_sum)):
            raise FloatingPointError(f"TraceRL loss is {loss_sum}; stopping before the weights are damaged")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
    return {"loss": loss_sum, "grad_norm": float(grad_norm), "rows": total_rows, "kl": stats["kl"],
            "clip_fraction": stats["clip_fraction"]}


def _log_probs(model, inputs, response) -> torch.Tensor:
    """[N, R] log-probabilities of the response tokens in each row's state."""
    input_ids, attention_mask = inputs
    logits = model(input_ids, attention_mask).logits[:, -response.shape[1] :]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, response[..., None])[..., 0]


def reference_log_probs(model, inputs, response) -> torch.Tensor:
    """Log-probabilities under the frozen base model: the same weights with the LoRA adapter disabled."""
    with model.model.disable_adapter():
        return _log_probs(model, inputs, response)


def _reward_metrics(trajectories) -> dict:
    names = [n for n in trajectories[0].rewards if n not in ("errors",)]
    metrics = {}
    for name in names:
        values = [v for t in trajectories for v in t.rewards[name] if v is not None]
        metrics[f"reward/{name}"] = sum(values) / max(1, len(values))
    metrics["nfe"] = float(torch.cat([t.nfe.double() for t in trajectories]).mean())
    metrics["reward_errors"] = sum(e is not None for t in trajectories for e in t.rewards["errors"])
    return metrics


def _log_completions(file, step: int, trajectories) -> None:
    for t in trajectories:
        for i, text in enumerate(t.completions):
            rewards = {n: v[i] for n, v in t.rewards.items()}
            file.write(json.dumps({"step": step, "prompt": t.rows[i]["prompt"], "completion": text, **rewards}) + "\n")
