"""TraceRL: reinforcement learning on the policy's own decoding trajectories (arXiv 2509.06949).

Each step: sample `num_generations` responses for `prompts_per_step` prompts with the rollout engine, score
them with the recipe's rewards, turn rewards into group z-score advantages (groups without variance are dropped;
a step left with nothing is skipped and logged), rebuild the visited states from `step_map` (`dlm_rl.rl.trace`),
recompute the old log-probs exactly, and take `inner_epochs` × `ppo_minibatches` PPO-clip optimiser steps (the
rollout's samples split into minibatches, so the ratio, its clip and the KL to π_old act). Logs go to `output_dir`
(`dlm_rl.run_log`): metrics.jsonl, the `report_to` trackers, completions.jsonl and curves.png.

Under `torchrun` / `accelerate launch` (`dlm_rl.distributed`) every rank samples its share of the step's prompts
with its own engine seed (or, with `rollout_actors`, rank 0's Ray actors sample every share and rank 0 sends each
rank its own), trains on the rows of its own trajectories, and the gradients are summed once per
optimiser step; rank 0 gathers the rollout for the logs, evaluates and saves.

`method` swaps how log-probabilities are read, everything else equal, for ablations: `tracerl` (the visited
states; plain rows for full attention, packed rows for block attention), `diffu_grpo`, `coupled` and
`random_masking` (random masks, `dlm_rl.rl.masking`). `wd1` also swaps the loss: diffu-GRPO's rows under wd1's
ratio-free weighted likelihood (no π_old, no KL). `justgrpo` swaps the rollout: strictly left to right, one token
per step, so the visited states give each token's exact log-probability (evaluation keeps the parallel sampler).
`espo` and `gdpo` swap the loss for a sequence-level one: one clipped ratio per response from its ELBO estimate;
`spg` for SPG's ratio-free one on a lower bound of each response's likelihood (A > 0) or an upper one (A ≤ 0);
`bgpo` for a bound of the sequence ratio that is linear in the ELBO's Monte Carlo draws. `igpo: true` (with any
method) samples groups whose answers all failed again with part of the reference solution in the canvas
(`dlm_rl.trainers.inpainting`).
`value_model: true` adds TraceRL's value model (`dlm_rl.rl.value`): per-token advantages by step-level GAE of the
group z-scores. docs/algorithms.md states each objective and where the defaults depart from the papers.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dlm_rl import distributed, sharding
from dlm_rl.checkpoint import checkpoint_due, prepare_output_dir, save_checkpoint, write_directory
from dlm_rl.guards import NonFiniteLoss, RolloutGuards
from dlm_rl.hub import push_final
from dlm_rl.models.lora import add_lora
from dlm_rl.rl.advantages import centred_advantages, group_advantages, leave_one_out_advantages, wd1_weights
from dlm_rl.rl.losses import (
    bounded_ratio_loss,
    ppo_trace_loss,
    sandwiched_log_likelihood,
    sequence_elbo,
    sequence_ppo_loss,
    weighted_likelihood_loss,
)
from dlm_rl.rl.masking import (
    block_mask_rows,
    diffu_grpo_rows,
    elbo_draw_rows,
    quadrature_rows,
    random_mask_rows,
    spread_mask_rows,
)
from dlm_rl.diffusion.packed import packed_block_size
from dlm_rl.rl.rows import Rows, reference_log_probs, response_log_probs
from dlm_rl.rl.trace import model_trace_rows
from dlm_rl.rl.value import ValueModel, clipped_value_loss, trace_gae
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.trainers.api import Callbacks, RLTrainer
from dlm_rl.trainers.inpainting import inpaint_failed_groups
from dlm_rl.trainers.optimization import (
    advance,
    enable_gradient_checkpointing,
    hold_master_weights,
    lr_scheduler,
    scheduled,
)
from dlm_rl.trainers.online import (
    OnlineArguments,
    PromptStream,
    check_prompts_fit,
    gather_rollout,
    held_out_metrics,
    load_task,
    require_positive,
    require_range,
    reward_metrics,
    rollout_engine,
    rollout_share,
    start_online_run,
    sync_rollout_weights,
)

logger = logging.getLogger(__name__)

METHODS = ("tracerl", "diffu_grpo", "coupled", "random_masking", "wd1", "justgrpo", "espo", "gdpo", "spg", "bgpo")
TRACE_METHODS = ("tracerl", "justgrpo")  # trained on the visited states
SEQUENCE_METHODS = ("espo", "gdpo", "spg")  # a loss of each response's whole likelihood estimate
RATIO_FREE = ("wd1", "spg")  # no π_old, ratio or KL
WITHOUT_KL = RATIO_FREE + ("bgpo",)


@dataclass
class TraceRLConfig(OnlineArguments):
    """TraceRL settings (the shared ones are `OnlineArguments`); every field can be a recipe key."""

    method: str = "tracerl"
    """How log-probabilities are read: 'tracerl' (the visited states), or the baselines 'diffu_grpo',
    'coupled', 'random_masking' (random masks; coupled and random_masking use the constant normaliser, as their
    1/t weights require); or 'wd1' (diffu-GRPO's rows, wd1's weighted likelihood instead of PPO: epsilon, beta and
    kl_reference play no part); or 'justgrpo' (rollouts strictly left to right, one token per step, whatever
    block_length and threshold say; trained on the visited states, whose log-probabilities are then exact); or the
    sequence-level 'espo' and 'gdpo' (one PPO ratio per response, exp of the change of its ELBO estimate per token of
    the canvas, with a k2 KL of the ELBOs: ESPO estimates the ELBO from a mask of spread size and its complement and
    uses leave-one-out advantages; GDPO from 3 Gauss–Legendre masking rates, with centred rewards as advantages); or
    'spg' (ratio-free: −A · the response's per-token log-likelihood, bounded from below (ELBO) for A > 0 and from
    above (a mix of EUBO and ELBO) otherwise, from `spg_draws` block-wise masks; epsilon, beta and kl_reference play
    no part); or 'bgpo' (a bound of the sequence ratio exp(ℓ − ℓ_old) that is linear in the ELBO's `bgpo_draws`
    Monte Carlo draws, so they can be spread over micro-batches: A(1 + x) for A ≥ 0, A·e^x for A < 0; no clip, no KL:
    epsilon, beta and kl_reference play no part)."""
    bgpo_draws: int = 8
    """BGPO: Monte Carlo draws of each response's ELBO per epoch (one row each)."""
    igpo: bool = False
    """IGPO's inpainting, with any method: for a prompt whose answers all earned ≤ 0, sample `igpo_share` of its
    group again with part of its reference solution (the dataset's `completion` column) in the canvas, and keep the
    right answers in place of wrong ones; the injected tokens are not trained."""
    igpo_share: float = 0.5
    """IGPO: the fraction of a failed group sampled again."""
    igpo_hint_min: float = 0.2
    """IGPO: each regeneration sees a fraction of the reference's tokens drawn uniformly from [min, max]."""
    igpo_hint_max: float = 0.6
    """IGPO: the upper end of that range."""
    spg_draws: int = 2
    """SPG: masks drawn per response and epoch (its reference scripts' num_t)."""
    spg_beta: float = 1.5
    """SPG: the EUBO's β (β ≥ 1 gives an upper bound)."""
    spg_mix: float = 0.5
    """SPG: the weight of the EUBO in the negative responses' estimate (1: EUBO alone, 0: ELBO alone)."""
    inner_epochs: int = 1
    """PPO epochs μ over each rollout's rows."""
    ppo_minibatches: int = 8
    """Optimiser steps per epoch: the rollout's samples are split into this many minibatches, so that from the
    second step on the ratio to π_old, its clip and the KL to π_old act (TraceRL's reference code steps every 256
    rows of a ~1024-response rollout: about 8 steps). 1: one step per rollout (on-policy REINFORCE with group
    z-scores)."""
    epsilon: float = 0.2
    """PPO clip range ε."""
    beta: float = 0.01
    """k3-KL weight (TraceRL: 0.01)."""
    kl_reference: str = "old"
    """KL anchor: 'old' (π_old, the rollout's weights) or 'reference' (the frozen base: the disabled LoRA adapter,
    so no second copy of the weights)."""
    old_log_probs: str = "recompute"
    """π_old: 'recompute' (exact, one extra forward) or 'sampler' (the log-probs recorded while decoding; exact
    only for methods tracerl and justgrpo with shrink 1)."""
    truncation_penalty: float = 0.0
    """Subtracted from the reward of a response that hit the length limit without EOS."""
    value_model: bool = False
    """TraceRL's value model: a copy of the backbone with a zero-initialised head (own LoRA adapter with LoRA)."""
    value_learning_rate: float = 5.0e-4
    """The value model's learning rate."""
    value_clip: float = 0.2
    """Clip range of the value loss."""
    gamma: float = 1.0
    """GAE discount over denoising steps (γ = λ = 1: A_j = R − V_j)."""
    lam: float = 1.0
    """GAE λ."""
    shrink: int = 1
    """Trace shrinkage s: merge every s consecutive steps into one training row."""
    normaliser: str = "length"
    """Per-row loss normaliser: 'length' (the constant response length, as TraceRL) or 'tokens' (the row's trained
    tokens: a sample's weight then grows with its number of steps)."""
    output_dir: str = "runs/tracerl"
    """Where metrics.jsonl, TensorBoard logs, completions.jsonl, curves.png and the final model go."""
    micro_batch_rows: int = 64
    """Rows per forward/backward pass (gradients accumulate over a rollout's rows: one optimiser step per epoch)."""

    def __post_init__(self):
        super().__post_init__()
        choices = {"method": METHODS, "old_log_probs": ("recompute", "sampler")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.old_log_probs == "sampler" and self.method not in TRACE_METHODS:
            raise ValueError("old_log_probs: 'sampler' needs method 'tracerl' or 'justgrpo' (the sampler scored the "
                             "visited states)")
        if self.old_log_probs == "sampler" and self.shrink > 1:
            raise ValueError("old_log_probs: 'sampler' needs shrink 1: a shrunk row's state masks tokens the sampler "
                             "had already decoded, so its recorded log-probs are not π_old's in that state")
        if self.method == "justgrpo" and self.shrink != 1:
            raise ValueError("method 'justgrpo' needs shrink 1: it trains each token in the one state it was drawn in")
        if self.igpo and self.rollout_actors:
            raise ValueError("igpo needs the trainer's own rollout engine (rollout_actors: 0): it samples failed "
                             "groups again within the step")
        if self.igpo and not self.igpo_hint_min <= self.igpo_hint_max:
            raise ValueError(f"igpo_hint_min ({self.igpo_hint_min}) must not exceed igpo_hint_max "
                             f"({self.igpo_hint_max})")
        if self.rollout_server is not None and (self.method in TRACE_METHODS or self.igpo):
            raise ValueError(f"rollout_server cannot serve {'igpo' if self.igpo else 'method ' + repr(self.method)}: "
                             "a server returns text and token ids, not the decoding steps "
                             f"{'or the inpainting it needs' if self.igpo else 'it trains on'}; use a method that "
                             f"re-masks completions ({', '.join(m for m in METHODS if m not in TRACE_METHODS)})")
        if self.value_model and self.method != "tracerl":
            raise ValueError("value_model needs method 'tracerl' (values are read on the visited states)")
        if self.normaliser not in ("tokens", "length"):
            raise ValueError(f"normaliser must be 'tokens' or 'length', got {self.normaliser!r}")
        if self.kl_reference not in ("old", "reference"):
            raise ValueError(f"kl_reference must be 'old' or 'reference', got {self.kl_reference!r}")
        if self.kl_reference == "reference" and not self.use_lora:
            raise ValueError("kl_reference: 'reference' needs use_lora (the reference is the disabled adapter)")
        if self.micro_batch_rows < 1:
            raise ValueError(f"micro_batch_rows must be at least 1, got {self.micro_batch_rows}")
        require_positive(self, "inner_epochs", "ppo_minibatches", "shrink", "spg_draws", "bgpo_draws")
        require_range(self, epsilon=(0, None), beta=(0, None), gamma=(0, 1), lam=(0, 1), value_clip=(0, None),
                      spg_beta=(1, None), spg_mix=(0, 1), igpo_share=(0, 1), igpo_hint_min=(0, 1),
                      igpo_hint_max=(0, 1))


def run(config: TraceRLConfig, *, model=None, train_dataset=None, eval_dataset=None, callbacks=None) -> dict:
    """Train; returns the final metrics line (also the last line of metrics.jsonl). `model` (a DiffusionLM),
    `train_dataset`, `eval_dataset` and `callbacks` as `TraceRLTrainer` takes them."""
    from dlm_rl.model_spec import resolve_model
    from dlm_rl.reward_functions import Rewards

    prepare_output_dir(config)
    data = load_task(config, train_dataset, eval_dataset)
    if config.igpo and not all(row.get("completion") for row in data.train):
        raise ValueError("igpo needs a reference solution per prompt: a 'completion' column in the training data")
    gen_length = config.gen_length or data.response_length
    if gen_length is None:
        raise ValueError("a train_dataset needs gen_length (the response canvas; only testbed tasks know theirs)")
    prompts = PromptStream(data.train, config.prompts_per_step, config.seed)
    torch.manual_seed(config.seed)
    rewards = Rewards(config.reward_funcs, config.reward_weights, timeout=config.reward_timeout,
                      max_failures=config.max_reward_failures)  # bad references fail before any work
    device = distributed.setup(config.fsdp)
    main = distributed.is_main()
    model = (model or resolve_model(config.model, trust_remote_code=config.trust_remote_code)).to(device)
    check_prompts_fit(model, data)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    value = ValueModel.from_policy(model, config) if config.value_model else None  # copied before the adapter
    if config.use_lora:
        add_lora(model, config)
    learner = Learner(model, config, gen_length, value)
    sampler = rollout_sampler(config, gen_length)
    engine = rollout_engine(config, model, rewards)
    guards = RolloutGuards(gen_length, config.constant_reward_patience, config.constant_reward_error)
    state = {"model": model, "optimizer": learner.optimizer, "generator": learner.generator, "prompts": prompts,
             "guards": guards, "nonfinite": learner.nonfinite}
    if engine is not None:  # with rollout_actors, only the main process has one
        state["engine"] = engine
    if value is not None:
        state.update(value_model=value, value_optimizer=learner.value_optimizer)
    if scheduled(config):
        state.update(zip(("scheduler", "value_scheduler"), learner.schedulers))
    done, log = start_online_run(config, state, main, engine, model)  # steps done before (0 for a new run)
    events = Callbacks(callbacks, config, done)

    def held_out() -> dict:
        return held_out_metrics(model, data.held_out, data.scorer, gen_length, config, rewards)

    line = {"step": done}
    sharding.gather(model)  # every rank: the whole weights for the rollout and rank 0's checks
    if main and not config.resume:
        line.update(held_out())
        log.log(line)
    model.train()  # π_old is scored in training mode, with or without the held-out check before
    skipped = 0
    stepped = False
    try:
        events.event("on_train_begin", model=model)
        steps = range(done + 1, config.max_steps + 1)
        for step in (bar := tqdm(steps, desc=f"{config.method}", initial=done, total=config.max_steps,
                                 disable=not main)):
            line = {"step": step}
            sharding.gather(model)  # whole again after a checkpoint
            start = time.perf_counter()
            trajectories = rollout_share(engine, prompts.next(), config, sampler)
            if config.igpo:
                trajectories, counts = inpaint_failed_groups(engine, trajectories, config, sampler, model.tokenizer,
                                                             learner.generator)
                line.update(counts)
            line["time/generation_and_reward"] = time.perf_counter() - start
            rollout = gather_rollout(trajectories)
            start = time.perf_counter()
            line.update(learner.update(trajectories))
            sharding.gather(model)  # the updated weights, whole again
            line["learning_rate"] = advance(*learner.schedulers)
            line["time/training"] = time.perf_counter() - start
            sync_rollout_weights(engine, model, config)
            stepped = True
            if not main:
                if checkpoint_due(config, step):
                    save_checkpoint(config, step, state)  # every process saves its own part
                if events.step_end(line):
                    break
                continue
            if line.get("skipped"):
                skipped += 1
                logger.warning("step %d: every group had equal rewards; no update (%d skipped so far)", step, skipped)
            log.log_completions(step, rollout)
            line.update(reward_metrics(rollout))
            line.update(guards(step, rollout))
            if step % config.eval_steps == 0 or step == config.max_steps:
                line.update(held_out())
            bar.set_postfix(reward=f"{line['reward/total']:.3f}", rows=line.get("rows", 0))
            log.log(line)
            if checkpoint_due(config, step):
                save_checkpoint(config, step, state)
                events.event("on_save")
            if events.step_end(line):
                logger.info("step %d: a callback stopped the run", step)
                break
        events.event("on_train_end", model=model)
    finally:
        if engine is not None:
            engine.close()
        if main and stepped and not sharding.is_sharded(model):  # a sharded model's whole weights need every rank
            write_directory(os.path.join(config.output_dir, "final"),
                            functools.partial(write_final, model=model, value=value))
        if main:
            log.close()
    if stepped and sharding.is_sharded(model):
        weights = sharding.whole_state_dict(model)
        value_weights = sharding.whole_state_dict(value) if value is not None else None
        if main:
            write_directory(os.path.join(config.output_dir, "final"), functools.partial(
                write_final, model=model, value=value, weights=weights, value_weights=value_weights))
    if main and stepped:
        push_final(config, os.path.join(config.output_dir, "final"))
    return line


def write_final(directory: str, model, value, weights=None, value_weights=None) -> None:
    """The final policy (`weights`: its state dict gathered from shards) and value model in `directory`."""
    model.save_pretrained(directory, **({"state_dict": weights} if weights is not None else {}))
    if value is not None:
        torch.save(value_weights if value_weights is not None else value.state_dict(),
                   os.path.join(directory, "value_model.pt"))


class Learner:
    """Turns a rollout's trajectories into `inner_epochs` policy (and value) updates."""

    def __init__(self, model, config: TraceRLConfig, gen_length: int, value: ValueModel | None = None):
        self.model, self.config, self.value, self.gen_length = model, config, value, gen_length
        self.models = [model] + ([value] if value is not None else [])
        hold_master_weights(config, *self.models)
        for module in self.models:
            distributed.broadcast_parameters(module.parameters())
            if config.fsdp and distributed.world_size() > 1:
                sharding.shard(module)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        if value is not None:
            self.value_parameters = [p for p in value.parameters() if p.requires_grad]
            self.value_optimizer = torch.optim.AdamW(self.value_parameters, lr=config.value_learning_rate)
        self.schedulers = [lr_scheduler(config, optimizer) for optimizer in
                           [self.optimizer] + ([self.value_optimizer] if value is not None else [])]
        random_rows = config.method in ("coupled", "random_masking")
        self.normaliser = gen_length if random_rows or config.normaliser == "length" else "tokens"
        self.generator = torch.Generator().manual_seed(config.seed + distributed.rank())  # the baselines' masks
        self.nonfinite = NonFiniteLoss(config.max_nonfinite_steps, "TraceRL")

    def gather(self) -> None:
        """Sharded models (fsdp): their whole weights, until the next gradient sum (`dlm_rl.sharding`)."""
        for module in self.models:
            sharding.gather(module)

    def rows(self, trajectory) -> Rows:
        method, mask_id = self.config.method, self.model.mask_token_id
        if method in TRACE_METHODS:
            return model_trace_rows(trajectory, self.model, self.config.shrink)
        block_size = packed_block_size(self.model)  # block models: earlier blocks clean, as the sampler saw them
        if method in ("diffu_grpo", "wd1"):
            return diffu_grpo_rows(trajectory, mask_id, self.generator, block_size=block_size)
        if method == "espo":
            return spread_mask_rows(trajectory, mask_id, self.generator, block_size=block_size)
        if method == "gdpo":
            return quadrature_rows(trajectory, mask_id, self.generator, block_size=block_size)
        if method == "spg":
            return block_mask_rows(trajectory, mask_id, self.generator, self.config.spg_draws, block_size=block_size)
        if method == "bgpo":
            return elbo_draw_rows(trajectory, mask_id, self.generator, self.config.bgpo_draws, block_size=block_size)
        return random_mask_rows(trajectory, mask_id, self.generator, coupled=method == "coupled", block_size=block_size)

    def update(self, trajectories) -> dict:
        """Build every epoch's rows and score them under π_old first, then take `ppo_minibatches` PPO steps per
        epoch; returns the metrics (averaged over the optimiser steps)."""
        self.gather()
        epochs, counts = self.prepare(trajectories)
        metrics = {"kept_fraction": counts["kept"] / max(1, counts["total"])}
        if not counts["kept"]:
            return {**metrics, "skipped": 1}
        steps = [self.step(minibatch) for batches in epochs for minibatch in self.minibatches(batches)]
        steps = [step for step in steps if step is not None]
        for name in steps[0]:
            values = [step[name] for step in steps if name in step]
            metrics[name] = sum(values) if name == "rows" else values[-1] if name.startswith("guard/") else (
                sum(values) / len(values))
        metrics["optimizer_steps"] = len(steps)
        return metrics

    def prepare(self, trajectories) -> tuple[list[list[dict]], dict]:
        """Per epoch, one batch per trajectory that trains: its rows (samples of groups with a signal only), π_old's
        log-probs and per-row entropy, the reference's log-probs, the advantages (and the value model's old values
        and returns). Also the global counts of kept and total samples (every rank decides alike)."""
        config, model = self.config, self.model
        epochs = [[] for _ in range(config.inner_epochs)]
        kept_samples = total_samples = 0
        for trajectory in trajectories:
            total = trajectory.rewards["total"]
            scored = torch.tensor([r is not None for r in total], dtype=torch.bool)  # None: a reward timed out
            rewards = torch.tensor([0.0 if r is None else r for r in total], dtype=torch.float64)
            truncated = torch.tensor([reason == "length" for reason in trajectory.finish_reason])
            rewards = rewards - config.truncation_penalty * truncated
            total_samples += len(rewards)
            # Group z-scores, with or without the value model (which learns to predict them); unscored samples
            # take no part in their group's statistics.
            advantages = torch.zeros(len(rewards), dtype=torch.float64)
            keep = torch.zeros(len(rewards), dtype=torch.bool)
            groups = torch.tensor(trajectory.prompt_index)
            weigh = {"wd1": wd1_weights, "espo": leave_one_out_advantages, "gdpo": centred_advantages,
                     "spg": centred_advantages}.get(
                config.method, group_advantages)
            advantages[scored], keep[scored] = weigh(rewards[scored], groups[scored])
            if not keep.any():
                continue
            kept_samples += int(keep.sum())
            for epoch in range(config.inner_epochs):
                if epoch and config.method in TRACE_METHODS:  # the visited states do not change between epochs
                    epochs[epoch].append(epochs[0][-1])
                    continue
                rows = self.rows(trajectory)
                rows = rows.select(keep.to(rows.sample.device)[rows.sample]).to(model.device)
                batch = {"rows": rows}
                if config.method in RATIO_FREE:  # no π_old (its entropy is unknown)
                    batch["entropy"] = torch.full((len(rows),), float("nan"), device=model.device)
                else:
                    batch["old"], batch["entropy"] = self.score_old(rows, trajectory)
                if config.method == "wd1":  # minibatches keep groups whole
                    batch["group"] = groups.to(model.device)[rows.sample]
                if config.kl_reference == "reference" and config.method not in WITHOUT_KL:
                    batch["reference"] = self.forward(lambda r: reference_log_probs(model, r), rows)
                if self.value is None:
                    batch["advantages"] = advantages.to(model.device, torch.float32)[rows.sample][:, None]
                else:
                    batch["old_values"] = self.forward(self.value, rows)
                    final = advantages.to(model.device)
                    batch["advantages"] = trace_gae(rows, batch["old_values"], final, config.gamma, config.lam)
                    batch["returns"] = batch["advantages"] + batch["old_values"]
                epochs[epoch].append(batch)
        return epochs, distributed.all_sum({"kept": kept_samples, "total": total_samples})

    def minibatches(self, batches: list[dict]) -> list[list[dict]]:
        """`batches` split into `ppo_minibatches` parts by sample (a sample's rows stay together; with wd1, whose
        weights sum to zero over a group, a group's), in a random order from the learner's generator; a part may be
        empty on a rank with few samples."""
        parts = self.config.ppo_minibatches
        samples = [(i, b) for i, batch in enumerate(batches) for b in torch.unique(_unit(batch)).tolist()]
        order = torch.randperm(len(samples), generator=self.generator).tolist()
        split = [[] for _ in range(parts)]
        for rank, index in enumerate(order):
            split[rank * parts // max(1, len(samples))].append(samples[index])
        minibatches = []
        for part in split:
            chosen = []
            for i, batch in enumerate(batches):
                picked = [b for j, b in part if j == i]
                if picked:
                    rows_of = torch.isin(_unit(batch), torch.tensor(picked, device=batch["rows"].sample.device))
                    chosen.append(_select(batch, rows_of))
            minibatches.append(chosen)
        return minibatches

    def score_old(self, rows: Rows, trajectory) -> tuple[torch.Tensor, torch.Tensor]:
        """π_old's log-probs of the rows and its mean entropy on each row's targets [N]. With the sampler's log-probs
        no forward pass is spent (that is the option's point) and the entropy is unknown (NaN)."""
        if self.config.old_log_probs == "sampler":
            recorded = trajectory.log_probs.to(rows.sample.device)[rows.sample]
            unknown = torch.full((len(rows),), float("nan"), device=recorded.device)
            return torch.where(rows.targets, recorded, torch.zeros_like(recorded)), unknown
        logp, entropy = self.forward(lambda r: response_log_probs(self.model, r, entropy=True), rows)
        return logp, (entropy * rows.targets).sum(1) / rows.targets.sum(1).clamp(min=1)

    @torch.no_grad()
    def forward(self, fn, rows: Rows):
        """`fn(rows)` in micro-batches, outputs concatenated (a tuple of outputs concatenated elementwise)."""
        size = self.config.micro_batch_rows
        outputs = [fn(rows.select(slice(i, i + size))) for i in range(0, len(rows), size)]
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        return torch.cat(outputs)

    def micro_batches(self, batch: dict) -> list:
        """How one forward/backward pass after another covers `batch`: slices of `micro_batch_rows` rows, or for the
        sequence-level methods, whose loss needs every row of a sample at once, whole samples (at least one)."""
        rows, size = batch["rows"], self.config.micro_batch_rows
        if self.config.method not in SEQUENCE_METHODS:
            return [slice(i, i + size) for i in range(0, len(rows), size)]
        samples = torch.unique(rows.sample)
        per_pass = max(1, size * len(samples) // len(rows))
        return [torch.isin(rows.sample, samples[i : i + per_pass]) for i in range(0, len(samples), per_pass)]

    def sequence_loss(self, logp: torch.Tensor, micro: dict, counts: dict) -> tuple[torch.Tensor, dict, float]:
        """The sequence-level loss of the whole samples in `micro` and their share of the step's loss: of its samples
        (ESPO, GDPO), or of its responses' summed spans (SPG, whose responses weigh their length)."""
        config, rows = self.config, micro["rows"]
        samples, index = torch.unique(rows.sample, return_inverse=True)

        def per_sample(values: torch.Tensor) -> torch.Tensor:  # a value all rows of a sample share, once per sample
            return torch.zeros(len(samples), dtype=values.dtype, device=values.device).scatter(0, index, values)

        advantages = per_sample(micro["advantages"][:, 0])
        if config.method == "spg":
            spans = per_sample(rows.weight)
            likelihood = sandwiched_log_likelihood(logp, rows.targets, index, spans, advantages > 0,
                                                   beta=config.spg_beta, mix=config.spg_mix)
            loss = -(advantages * spans * likelihood).sum() / spans.sum().clamp(min=1)  # spans 0: all given (IGPO)
            share = float(spans.sum()) / max(counts["spans"], 1.0)
            return loss, {"log_likelihood": float(likelihood.detach().mean())}, share

        def elbo(values: torch.Tensor) -> torch.Tensor:
            return sequence_elbo(values, rows.targets, rows.weight, index, len(samples))

        reference = elbo(micro["reference"]) if "reference" in micro else None
        loss, stats = sequence_ppo_loss(elbo(logp), elbo(micro["old"]), advantages, self.gen_length,
                                        epsilon=config.epsilon, beta=config.beta, elbo_ref=reference)
        return loss, stats, len(samples) / counts["samples"]

    def step(self, batches: list[dict]) -> dict | None:
        """One optimiser step of the policy (and the value model) over all rows of `batches`. Under data parallelism
        `batches` are this rank's, the losses are divided by the global row and token counts, and the metrics are
        the global ones."""
        config, model = self.config, self.model
        counts = distributed.all_sum({"rows": sum(len(b["rows"]) for b in batches),
                                      "targets": sum(int(b["rows"].targets.sum()) for b in batches),
                                      "samples": sum(len(torch.unique(b["rows"].sample)) for b in batches),
                                      "spans": sum(_span_total(b["rows"]) for b in batches)  # SPG's only
                                      if config.method == "spg" else 0.0})
        total_rows = counts["rows"]
        if not total_rows:  # fewer samples than minibatches: nothing to step on
            return None
        logged = {"wd1": ("log_likelihood",), "spg": ("log_likelihood",), "bgpo": ("ratio_mean",)}.get(
            config.method, ("kl", "clip_fraction"))  # the loss's statistics
        sums = {"loss": 0.0, "value_loss": 0.0, **dict.fromkeys(logged, 0.0)}
        self.gather()
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.value is not None:
            self.value_optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            for part in self.micro_batches(batch):
                micro = _select(batch, part)
                rows = micro["rows"]
                logp = response_log_probs(model, rows)
                if config.method in SEQUENCE_METHODS:
                    loss, stats, share = self.sequence_loss(logp, micro, counts)
                elif config.method == "wd1":
                    loss, stats = weighted_likelihood_loss(logp, micro["advantages"], rows.targets)
                    share = len(rows) / total_rows
                elif config.method == "bgpo":
                    loss, stats = bounded_ratio_loss(logp, micro["old"], micro["advantages"], rows.targets, rows.weight)
                    share = len(rows) / total_rows
                else:
                    loss, stats = ppo_trace_loss(
                        logp, micro["old"], micro["advantages"], rows.targets, epsilon=config.epsilon,
                        beta=config.beta, logp_ref=micro.get("reference"), normaliser=self.normaliser,
                        weights=rows.weight,
                    )
                    share = len(rows) / total_rows
                (loss * share).backward()
                sums["loss"] += loss.item() * share
                for name in stats.keys() & sums.keys():
                    sums[name] += stats[name] * share
                if self.value is not None:  # averaged over every target token of the step
                    value_loss = clipped_value_loss(self.value(rows), micro["old_values"], micro["returns"],
                                                    rows.targets, config.value_clip,
                                                    count=counts["targets"])
                    value_loss.backward()
                    sums["value_loss"] += value_loss.item()
        sums["entropy"] = float(sum(b["entropy"].sum() for b in batches)) / max(1, total_rows)
        if self.value is not None:
            sums["value_sum"] = float(sum((b["old_values"] * b["rows"].targets).sum() for b in batches))
        sums = distributed.all_sum(sums)
        sharding.sum_gradients(model, self.parameters)
        if self.value is not None:
            sharding.sum_gradients(self.value, self.value_parameters)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
        optimizers = [self.optimizer] + ([self.value_optimizer] if self.value is not None else [])
        skipped = self.nonfinite.skip(optimizers, loss=sums["loss"], value_loss=sums["value_loss"],
                                      grad_norm=float(grad_norm))
        entropy, value_sum = sums.pop("entropy"), sums.pop("value_sum", None)
        metrics = {**sums, "grad_norm": float(grad_norm), "rows": int(total_rows),
                   "guard/nonfinite_steps": self.nonfinite.count}
        if self.config.old_log_probs == "recompute" and self.config.method not in RATIO_FREE:
            metrics["entropy"] = entropy
        if self.value is None:
            del metrics["value_loss"]
        if skipped:
            return metrics
        self.optimizer.step()
        if self.value is not None:
            torch.nn.utils.clip_grad_norm_(self.value_parameters, config.max_grad_norm)
            self.value_optimizer.step()
            metrics["value_mean"] = value_sum / counts["targets"]
        return metrics


class TraceRLTrainer(RLTrainer):
    """TraceRL in TRL's shape (`dlm_rl.trainers.api`): `TraceRLTrainer(model, args=TraceRLConfig(...),
    train_dataset=..., reward_funcs=[...]).train()`."""

    config_class = TraceRLConfig
    run = staticmethod(run)


def rollout_sampler(config: TraceRLConfig, gen_length: int) -> SamplerConfig:
    """The rollouts' sampler: the recipe's, or with justgrpo one token per one-token block (left to right)."""
    left_to_right = config.method == "justgrpo"
    return SamplerConfig(gen_length=gen_length, block_length=1 if left_to_right else config.block_length,
                         threshold=None if left_to_right else config.threshold, temperature=config.temperature)


def _unit(batch: dict) -> torch.Tensor:
    """Per row of a learner batch, what minibatches keep together: its sample, or (wd1) its group."""
    return batch["group"] if "group" in batch else batch["rows"].sample


def _span_total(rows: Rows) -> float:
    """The summed spans of the samples SPG's `rows` hold (each row's weight is its sample's span)."""
    samples, index = torch.unique(rows.sample, return_inverse=True)
    return float(torch.zeros(len(samples), device=rows.weight.device).scatter(0, index, rows.weight).sum())


def _select(batch: dict, rows: torch.Tensor) -> dict:
    """The part of a learner batch that belongs to the chosen rows (a bool mask over its rows)."""
    return {name: value.select(rows) if isinstance(value, Rows) else value[rows] for name, value in batch.items()}
