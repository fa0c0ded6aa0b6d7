"""VRPO trainer: preference optimisation of a diffusion LM on ELBO estimates (LLaDA 1.5; `dlm_rl.rl.vrpo`).

Pairs come either from a dataset with `prompt`, `chosen`, `rejected` columns (`dataset:`), or on-policy: each
step samples `num_generations` responses per prompt, scores them with the recipe's rewards, and pairs the best
with the worst response of each prompt when their rewards differ by more than `min_margin` (ties and small
margins are dropped and counted). On-policy pairs keep the sampled token ids; nothing is decoded and re-encoded.
Logs as TraceRL's (`dlm_rl.run_log`): loss, score, implicit accuracy, reward margin and the estimator's variance.

Under `torchrun` / `accelerate launch` (`dlm_rl.distributed`) every rank takes its share of the step's prompts or
pairs (and samples its prompts with its own seed), the loss is divided by the global number of pairs, and the
gradients are summed once per step; rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dlm_rl import distributed
from dlm_rl.checkpoint import checkpoint_due, save_checkpoint, write_directory
from dlm_rl.guards import NonFiniteLoss, RolloutGuards
from dlm_rl.models.lora import add_lora
from dlm_rl.rl.vrpo import PreferenceEstimator, collate_pairs, fitting_pairs, vrpo_loss
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.trainers.online import (
    OnlineArguments,
    PromptStream,
    gather_rollout,
    held_out_metrics,
    load_task,
    require_range,
    reward_metrics,
    rollout_engine,
    rollout_share,
    start_online_run,
    sync_rollout_weights,
)

logger = logging.getLogger(__name__)


@dataclass
class VRPOConfig(OnlineArguments):
    """VRPO settings (the shared ones are `OnlineArguments`); every field can be a recipe key."""

    dataset: str | None = None
    """Preference pairs: a .json/.jsonl file or a hub dataset with prompt/chosen/rejected columns. Unset: pairs
    are built on-policy from rollouts scored by `reward_funcs`. Conversational pairs whose prompt is the shared
    first turns of `chosen` and `rejected` (no or a plain-text `prompt` column) have it split off."""
    dataset_split: str = "train"
    """The split of a hub `dataset` to train on (e.g. `train_prefs` for HuggingFaceH4/ultrafeedback_binarized); a
    local file is read whole."""
    beta: float = 0.2
    """Preference temperature β of the score ŝ."""
    n_t: int = 8
    """Timesteps per ELBO estimate (budget n = n_t × n_yt)."""
    n_yt: int = 1
    """Masks per timestep (1 is VRPO's optimal allocation)."""
    antithetic: bool = True
    """The policy and the reference score a response with the same noise."""
    estimator_form: str = "tokens"
    """'tokens' (ℓ masked of L, weight L/ℓ) or 'time' (t ~ U, weight 1/t)."""
    min_margin: float = 0.0
    """On-policy pairs: keep a prompt's best/worst pair only when their rewards differ by more than this."""
    micro_batch_pairs: int = 16
    """Pairs per forward/backward pass (one optimiser step per training step)."""
    draws_per_graph: int | None = None
    """Bound activation memory: compute the policy's ELBO draws this many at a time and recompute each batch's
    forward in the backward pass (activation checkpointing), for one forward more and the same gradient. Peak
    activations are then those of micro_batch_pairs × draws_per_graph sequences instead of 2 × n_t × n_yt × that.
    None: keep every draw's graph (fastest)."""
    output_dir: str = "runs/vrpo"
    """Where metrics.jsonl, TensorBoard logs, completions.jsonl, curve.png and the final model go."""

    def __post_init__(self):
        super().__post_init__()
        PreferenceEstimator(self.n_t, self.n_yt, self.antithetic, self.estimator_form)  # validates the budget
        if self.estimator_form not in ("tokens", "time"):
            raise ValueError(f"estimator_form must be 'tokens' or 'time', got {self.estimator_form!r}")
        if self.dataset is not None and self.rollout_actors:
            raise ValueError("rollout_actors samples on-policy pairs; with a `dataset` of pairs there is nothing to "
                             "sample (unset one of them)")
        if self.draws_per_graph is not None and self.draws_per_graph < 1:
            raise ValueError(f"draws_per_graph must be at least 1 or None, got {self.draws_per_graph}")
        if self.micro_batch_pairs < 1:
            raise ValueError(f"micro_batch_pairs must be at least 1, got {self.micro_batch_pairs}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive (β = 0 makes every score 0: nothing to learn), got {self.beta}")
        require_range(self, min_margin=(0, None))
        if self.dataset is not None and self.dataset.endswith((".json", ".jsonl")):
            from dlm_rl.data.files import refuse_empty_file

            refuse_empty_file(self.dataset, "dataset")


def on_policy_pairs(trajectories, min_margin: float) -> tuple[dict, dict, dict]:
    """(chosen, rejected, counts): each prompt's best and worst sample as token-id batches, and how many prompts
    were dropped as ties (all rewards equal) or below the margin. Samples without a reward (None: a reward timed
    out) are left out."""
    chosen, rejected = [], []
    counts = {"pairs": 0, "ties_dropped": 0, "below_margin": 0}
    for t in trajectories:
        totals = torch.tensor([float("nan") if r is None else r for r in t.rewards["total"]], dtype=torch.float64)
        groups = torch.tensor(t.prompt_index)
        for group in torch.unique(groups).tolist():
            members = ((groups == group) & ~totals.isnan()).nonzero()[:, 0]
            if len(members) < 2:
                continue
            values = totals[members]
            best, worst = members[values.argmax()], members[values.argmin()]
            margin = float(values.max() - values.min())
            if margin == 0:
                counts["ties_dropped"] += 1
            elif margin <= min_margin:
                counts["below_margin"] += 1
            else:
                chosen.append(_row(t, best))
                rejected.append(_row(t, worst))
                counts["pairs"] += 1
    return _stack(chosen), _stack(rejected), counts


def _row(t, b: int) -> dict:
    prompt_width = t.prompt_ids.shape[1]
    response = torch.ones_like(t.response_ids[b])
    return {
        "input_ids": torch.cat([t.prompt_ids[b], t.response_ids[b]]),
        "attention_mask": torch.cat([t.prompt_mask[b], response]),
        "response_mask": torch.cat([torch.zeros(prompt_width, dtype=torch.bool, device=response.device),
                                    response.bool()]),
    }


def _stack(rows: list[dict]) -> dict:
    """Stack rows of possibly different prompt widths, left padding the shorter ones."""
    if not rows:
        return {}
    width = max(len(r["input_ids"]) for r in rows)

    def pad(x, value):
        return torch.cat([x.new_full((width - len(x),), value), x])

    return {
        "input_ids": torch.stack([pad(r["input_ids"], 0) for r in rows]),
        "attention_mask": torch.stack([pad(r["attention_mask"], 0) for r in rows]),
        "response_mask": torch.stack([pad(r["response_mask"], False) for r in rows]),
    }


def run(config: VRPOConfig) -> dict:
    """Train; returns the final metrics line (also the last line of metrics.jsonl)."""
    from dlm_rl.model_spec import resolve_model
    from dlm_rl.reward_functions import Rewards

    train, held_out_rows, scorer, task_length = load_task(config)
    torch.manual_seed(config.seed)
    rewards = Rewards(config.reward_funcs, config.reward_weights, timeout=config.reward_timeout,
                      max_failures=config.max_reward_failures)
    device = distributed.setup()
    main = distributed.is_main()
    model = resolve_model(config.model, trust_remote_code=config.trust_remote_code).to(device)
    gen_length = config.gen_length or task_length
    pairs = load_pairs(config.dataset, config.dataset_split, model.tokenizer, gen_length) if config.dataset else None
    frozen = None if config.use_lora else copy.deepcopy(model).requires_grad_(False).eval()
    if config.use_lora:
        add_lora(model, config)
    estimator = PreferenceEstimator(config.n_t, config.n_yt, config.antithetic, config.estimator_form)
    parameters = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator(device).manual_seed(config.seed + distributed.rank())
    sampler = SamplerConfig(gen_length=gen_length, block_length=config.block_length, threshold=config.threshold,
                            temperature=config.temperature)
    engine = None if pairs else rollout_engine(config, model, rewards)
    stream = PromptStream(pairs or train, config.prompts_per_step, config.seed)
    nonfinite = NonFiniteLoss(config.max_nonfinite_steps, "VRPO")
    guards = RolloutGuards(gen_length, config.constant_reward_patience, config.constant_reward_error)
    state = {"model": model, "optimizer": optimizer, "generator": generator, "prompts": stream, "guards": guards,
             "nonfinite": nonfinite}
    if engine is not None:
        state["engine"] = engine
    done, log = start_online_run(config, state, main, engine, model)  # steps done before (0 for a new run)

    def held_out() -> dict:
        return held_out_metrics(model, held_out_rows, scorer, gen_length, config.block_length, rewards)

    line = {"step": done}
    if main and not config.resume:
        line.update(held_out())
        log.log(line)
    try:
        steps = range(done + 1, config.max_steps + 1)
        for step in (bar := tqdm(steps, desc="vrpo", initial=done, total=config.max_steps, disable=not main)):
            line = {"step": step}
            start = time.perf_counter()
            rollout = None
            if pairs:
                chosen, rejected = collate_pairs(model.tokenizer, distributed.share(stream.next()), gen_length)
            else:
                trajectories = rollout_share(engine, stream.next(), config, sampler)
                rollout = gather_rollout(trajectories)
                chosen, rejected, counts = on_policy_pairs(trajectories, config.min_margin)
                line.update({name: int(n) for name, n in distributed.all_sum(counts).items()})
            line["time/generation_and_reward"] = time.perf_counter() - start
            start = time.perf_counter()
            if distributed.all_sum(len(chosen.get("input_ids", ()))):  # a rank without pairs still joins the sum
                line.update(_update(model, optimizer, parameters, chosen, rejected, estimator, config, generator,
                                    frozen, nonfinite))
            else:
                if main:
                    logger.warning("step %d: no preference pair (every prompt's rewards tied or were too close)",
                                   step)
                line["skipped"] = 1
            line["time/training"] = time.perf_counter() - start
            sync_rollout_weights(engine, model, config)
            if not main:
                continue
            if rollout is not None:
                log.log_completions(step, rollout)
                line.update(reward_metrics(rollout))
                line.update(guards(step, rollout))
            if step % config.eval_steps == 0 or step == config.max_steps:
                line.update(held_out())
            bar.set_postfix(loss=f"{line.get('loss', float('nan')):.3f}", pairs=line.get("pairs", 0))
            log.log(line)
            if checkpoint_due(config, step):
                save_checkpoint(config, step, state)
    finally:
        if engine is not None:
            engine.close()
        if main:
            write_directory(os.path.join(config.output_dir, "final"), model.save_pretrained)
            log.close(curve=("reward/total", "eval/greedy_accuracy", "implicit_accuracy"))
    return line


def _update(model, optimizer, parameters, chosen, rejected, estimator, config, generator, frozen, nonfinite) -> dict:
    """One optimiser step over all pairs, in micro-batches (none if `nonfinite` skips it); returns the pair-weighted
    statistics. Under data parallelism the pairs are this rank's (possibly none), the loss is divided by the global
    number of pairs, and the statistics are the global ones."""
    device = model.device
    local = len(chosen.get("input_ids", ()))
    total = distributed.all_sum(local)
    sums = {"loss": 0.0, "score_mean": 0.0, "implicit_accuracy": 0.0, "reward_margin": 0.0, "estimator_var": 0.0}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for i in range(0, local, config.micro_batch_pairs):
        part = {k: v[i : i + config.micro_batch_pairs].to(device) for k, v in chosen.items()}
        other = {k: v[i : i + config.micro_batch_pairs].to(device) for k, v in rejected.items()}
        share = len(part["input_ids"]) / total
        loss, stats = vrpo_loss(model, part, other, estimator, config.beta, generator=generator, frozen=frozen,
                                draws_per_graph=config.draws_per_graph)
        (loss * share).backward()
        sums["loss"] += loss.item() * share
        for name in ("score_mean", "implicit_accuracy", "reward_margin", "estimator_var"):
            sums[name] += stats[name] * share
    sums = distributed.all_sum(sums)
    distributed.sum_gradients(parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    if not nonfinite.skip([optimizer], loss=sums["loss"], grad_norm=float(grad_norm)):
        optimizer.step()
    return {**sums, "grad_norm": float(grad_norm), "pairs": int(total), "guard/nonfinite_steps": nonfinite.count}


def load_pairs(name: str, split: str, tokenizer, response_length: int) -> list[dict]:
    """Rows of a preference dataset (a local .json/.jsonl file or a hub dataset), with implicit conversational
    prompts split off and the pairs whose responses do not fit `response_length` dropped (counted in the log)."""
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_extract_prompt

    from dlm_rl.data.collate import require_columns
    from dlm_rl.data.files import load_rows

    if name.endswith((".json", ".jsonl")):
        dataset = load_rows(name)  # empty files, mixed types and non-text prompts are errors naming the row
    else:
        dataset = load_dataset(name, split=split)
    require_columns(dataset, ["chosen", "rejected"], f"VRPO dataset {name}")
    if len(dataset) == 0:
        raise ValueError(f"VRPO dataset {name} has no rows")
    if is_conversational({"chosen": dataset[0]["chosen"]}):
        dataset = dataset.map(maybe_extract_prompt, desc="splitting off the shared prompt turns")
    require_columns(dataset, ["prompt", "chosen", "rejected"], f"VRPO dataset {name}")
    rows = list(dataset)
    fits = fitting_pairs(tokenizer, rows, response_length)
    kept = [row for row, fit in zip(rows, fits) if fit]
    if len(kept) < len(rows):
        logger.warning("VRPO dataset %s: %d of %d pairs have a response longer than gen_length=%d (+1 EOS) and "
                       "are dropped", name, len(rows) - len(kept), len(rows), response_length)
    if not kept:
        raise ValueError(f"VRPO dataset {name}: no pair fits gen_length={response_length}; raise gen_length")
    return kept
