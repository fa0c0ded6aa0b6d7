"""VRPO trainer: preference optimisation of a diffusion LM on ELBO estimates (LLaDA 1.5; `dlm_rl.rl.vrpo`).

The data keys are TraceRL's (`dlm_rl.data.sources`: `dataset_name` or `dataset_path`, the splits, or the
`train_dataset` / `eval_dataset` of `VRPOTrainer`). A source whose rows have `chosen` and `rejected` (TRL's
preference format: an explicit `prompt`, or conversations whose shared first turns are split off as the prompt)
gives the pairs, and the held-out check scores its test split's pairs (or `eval_size` pairs held out of the
training ones, never trained on) with the VRPO estimator, without gradients and with the same noise at every
check: `eval/loss`, `eval/score_mean`, `eval/implicit_accuracy`. Pairs whose responses do not fit `gen_length`
are dropped and counted. Any other source gives prompts, and the pairs are built on-policy: each step samples
`num_generations` responses per prompt, scores them with the recipe's rewards, and pairs the best with the worst
response of each prompt when their rewards differ by more than `min_margin` (ties and small margins are dropped
and counted); on-policy pairs keep the sampled token ids, and the held-out check is TraceRL's. Logs as TraceRL's
(`dlm_rl.run_log`): loss, score, implicit accuracy, reward margin and the estimator's variance.

Under `torchrun` / `accelerate launch` (`dlm_rl.distributed`) every rank takes its share of the step's prompts or
pairs (and samples its prompts with its own seed), the loss is divided by the global number of pairs, and the
gradients are summed once per step; rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from dlm_rl import distributed, sharding
from dlm_rl.checkpoint import checkpoint_due, prepare_output_dir, save_checkpoint, write_directory
from dlm_rl.data.benchmarks import FILE_EXTENSIONS
from dlm_rl.data.collate import drop_shared_padding, require_columns
from dlm_rl.data.files import refuse_empty_file
from dlm_rl.data.sources import (
    PromptData,
    as_dataset,
    hold_out,
    is_conversational,
    load_prompts,
    load_splits,
    shape_prompt,
)
from dlm_rl.guards import NonFiniteLoss, RolloutGuards
from dlm_rl.hub import push_final
from dlm_rl.models.lora import add_lora
from dlm_rl.rl.vrpo import PreferenceEstimator, collate_pairs, fitting_pairs, vrpo_loss
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.trainers.api import Callbacks, RLTrainer
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
    """VRPO settings (the shared ones are `OnlineArguments`, the data keys among them); every field can be a recipe
    key."""

    dataset: str | None = None
    """Deprecated: dataset_path (a local file or directory) or dataset_name (a hub dataset)."""
    dataset_split: str | None = None
    """Deprecated: dataset_train_split."""
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
    """Where metrics.jsonl, TensorBoard logs, completions.jsonl, curves.png and the final model go."""

    def __post_init__(self):
        self._rename_deprecated_keys()
        super().__post_init__()
        PreferenceEstimator(self.n_t, self.n_yt, self.antithetic, self.estimator_form)  # validates the budget
        if self.estimator_form not in ("tokens", "time"):
            raise ValueError(f"estimator_form must be 'tokens' or 'time', got {self.estimator_form!r}")
        if self.draws_per_graph is not None and self.draws_per_graph < 1:
            raise ValueError(f"draws_per_graph must be at least 1 or None, got {self.draws_per_graph}")
        if self.micro_batch_pairs < 1:
            raise ValueError(f"micro_batch_pairs must be at least 1, got {self.micro_batch_pairs}")
        if not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be positive and finite (β = 0 makes every score 0: nothing to learn), got "
                             f"{self.beta}")
        require_range(self, min_margin=(0, None))
        if self.dataset_path is not None:  # a local dataset of pairs is counted before any model loads
            train, test = load_splits(self)
            if _has_pairs(train, self.dataset_path):
                require_pairs(self, len(train), test is not None, self.dataset_path)

    def _rename_deprecated_keys(self) -> None:
        """`dataset` to dataset_path (a local file) or dataset_name, `dataset_split` to dataset_train_split."""
        if self.dataset is not None:
            logger.warning("`dataset` is deprecated and will be removed in the next release: use dataset_path (a "
                           "local file) or dataset_name (a hub dataset): %s", self.dataset)
            if self.dataset_name is not None or self.dataset_path is not None:
                raise ValueError(f"dataset ({self.dataset!r}) is the old name of dataset_path and dataset_name: give "
                                 "one of them")
            if self.task is not None:
                logger.warning("task %r chose the held-out check of a `dataset` of pairs; that check now scores "
                               "held-out pairs, so task is ignored", self.task)
                self.task = None
            refuse_empty_file(self.dataset, "dataset")
            local = os.path.exists(self.dataset) or self.dataset.lower().endswith(FILE_EXTENSIONS)
            setattr(self, "dataset_path" if local else "dataset_name", self.dataset)
            self.dataset = None
        if self.dataset_split is not None:
            logger.warning("`dataset_split` is deprecated and will be removed in the next release: use "
                           "dataset_train_split: %s", self.dataset_split)
            self.dataset_train_split, self.dataset_split = self.dataset_split, None


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


def run(config: VRPOConfig, *, model=None, train_dataset=None, eval_dataset=None, callbacks=None) -> dict:
    """Train; returns the final metrics line (also the last line of metrics.jsonl). `model` (a DiffusionLM),
    `train_dataset`, `eval_dataset` and `callbacks` as `VRPOTrainer` takes them."""
    from dlm_rl.model_spec import known_tokenizer, resolve_model
    from dlm_rl.reward_functions import Rewards

    prepare_output_dir(config)
    data = load_data(config, train_dataset, eval_dataset)
    pairs = isinstance(data, PairData)
    gen_length = config.gen_length or (None if pairs else data.response_length)
    if gen_length is None:
        raise ValueError("gen_length is not set: only the testbed tasks know their response canvas")
    stream = None if pairs else PromptStream(data.train, config.prompts_per_step, config.seed)
    torch.manual_seed(config.seed)
    rewards = Rewards(config.reward_funcs, config.reward_weights, timeout=config.reward_timeout,
                      max_failures=config.max_reward_failures)
    device = distributed.setup(config.fsdp)
    main = distributed.is_main()
    tokenizer = (model.tokenizer if model is not None else known_tokenizer(config.model)) if pairs else None
    if tokenizer is not None:  # the pairs are checked before the model loads
        data = fit_pairs(data, tokenizer, gen_length, config)
    model = (model or resolve_model(config.model, trust_remote_code=config.trust_remote_code)).to(device)
    if not pairs:
        check_prompts_fit(model, data)
    elif tokenizer is None:
        data = fit_pairs(data, model.tokenizer, gen_length, config)
    if stream is None:  # the pairs' count is final once they are fitted
        stream = PromptStream(data.train, config.prompts_per_step, config.seed)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    frozen = None if config.use_lora else copy.deepcopy(model).requires_grad_(False).eval()
    if config.use_lora:
        add_lora(model, config)
    hold_master_weights(config, model)  # after the frozen copy: the reference stays in the checkpoint's dtype
    estimator = PreferenceEstimator(config.n_t, config.n_yt, config.antithetic, config.estimator_form)
    distributed.broadcast_parameters(model.parameters())
    if config.fsdp and distributed.world_size() > 1:
        sharding.shard(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = lr_scheduler(config, optimizer)
    generator = torch.Generator(device).manual_seed(config.seed + distributed.rank())
    sampler = SamplerConfig(gen_length=gen_length, block_length=config.block_length, threshold=config.threshold,
                            temperature=config.temperature)
    engine = None if pairs else rollout_engine(config, model, rewards)
    nonfinite = NonFiniteLoss(config.max_nonfinite_steps, "VRPO")
    guards = RolloutGuards(gen_length, config.constant_reward_patience, config.constant_reward_error)
    state = {"model": model, "optimizer": optimizer, "generator": generator, "prompts": stream, "guards": guards,
             "nonfinite": nonfinite}
    if engine is not None:
        state["engine"] = engine
    if scheduled(config):
        state["scheduler"] = scheduler
    done, log = start_online_run(config, state, main, engine, model)  # steps done before (0 for a new run)
    events = Callbacks(callbacks, config, done)

    def held_out() -> dict:
        if pairs:
            return held_out_pairs(model, data.held_out, gen_length, estimator, config, frozen)
        return held_out_metrics(model, data.held_out, data.scorer, gen_length, config, rewards)

    line = {"step": done}
    sharding.gather(model)  # every rank: the whole weights for the rollout, the update and rank 0's checks
    if main and not config.resume:
        line.update(held_out())
        log.log(line)
    stepped = False
    try:
        events.event("on_train_begin", model=model)
        steps = range(done + 1, config.max_steps + 1)
        for step in (bar := tqdm(steps, desc="vrpo", initial=done, total=config.max_steps, disable=not main)):
            line = {"step": step}
            sharding.gather(model)  # whole again after a checkpoint
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
            sharding.gather(model)  # the updated weights, whole again
            line["learning_rate"] = advance(scheduler)
            line["time/training"] = time.perf_counter() - start
            sync_rollout_weights(engine, model, config)
            stepped = True
            if not main:
                if checkpoint_due(config, step):
                    save_checkpoint(config, step, state)  # every process saves its own part
                if events.step_end(line):
                    break
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
                events.event("on_save")
            if events.step_end(line):
                logger.info("step %d: a callback stopped the run", step)
                break
        events.event("on_train_end", model=model)
    finally:
        if engine is not None:
            engine.close()
        if main and stepped and not sharding.is_sharded(model):  # a sharded model's whole weights need every rank
            write_directory(os.path.join(config.output_dir, "final"), model.save_pretrained)
        if main:
            log.close(curve=("reward/total", "eval/greedy_accuracy", "implicit_accuracy", "eval/implicit_accuracy"))
    if stepped and sharding.is_sharded(model):
        whole = sharding.whole_state_dict(model)
        if main:
            write_directory(os.path.join(config.output_dir, "final"),
                            functools.partial(model.save_pretrained, state_dict=whole))
    if main and stepped:
        push_final(config, os.path.join(config.output_dir, "final"))
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
        part = drop_shared_padding({k: v[i : i + config.micro_batch_pairs].to(device) for k, v in chosen.items()})
        other = drop_shared_padding({k: v[i : i + config.micro_batch_pairs].to(device) for k, v in rejected.items()})
        share = len(part["input_ids"]) / total
        loss, stats = vrpo_loss(model, part, other, estimator, config.beta, generator=generator, frozen=frozen,
                                draws_per_graph=config.draws_per_graph)
        (loss * share).backward()
        sums["loss"] += loss.item() * share
        for name in ("score_mean", "implicit_accuracy", "reward_margin", "estimator_var"):
            sums[name] += stats[name] * share
    sums = distributed.all_sum(sums)
    sharding.sum_gradients(model, parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    if not nonfinite.skip([optimizer], loss=sums["loss"], grad_norm=float(grad_norm)):
        optimizer.step()
    return {**sums, "grad_norm": float(grad_norm), "pairs": int(total), "guard/nonfinite_steps": nonfinite.count}


@dataclass
class PairData:
    """Preference pairs (`prompt`, `chosen`, `rejected`; prompts shaped by the dataset keys) to train on, and the
    held-out ones, none of whose prompts is trained on."""

    train: list[dict]
    held_out: list[dict]
    name: str


def load_data(config: VRPOConfig, train_dataset=None, eval_dataset=None) -> PairData | PromptData:
    """The source's pairs when its rows have `chosen` and `rejected` (held out: the first eval_size of its test
    split, else eval_size of its pairs drawn with the seed), else its prompts (`load_task`), for on-policy pairs."""
    if train_dataset is not None:
        name, train = "train_dataset", as_dataset(train_dataset, "train_dataset")
        test = None if eval_dataset is None else as_dataset(eval_dataset, "eval_dataset")
    elif config.generated or eval_dataset is not None:
        return load_task(config, train_dataset, eval_dataset)
    else:
        name = config.dataset_path or config.dataset_name
        train, test = load_splits(config)
    if not _has_pairs(train, name):
        return load_prompts(config, config.seed, train, test, name=name)
    require_pairs(config, len(train), test is not None, name)
    train = pair_rows(train, name)
    if test is None:
        train, test = hold_out(train, config.eval_size, config.seed, name, config.dataset_test_split)
        held_out = list(test)
    else:
        held_out = pair_rows(test.select(range(min(config.eval_size, len(test)))), f"{name} (held out)")
    asked = {repr(row["prompt"]) for row in held_out}
    kept = [row for row in train if repr(row["prompt"]) not in asked]
    if len(kept) < len(train):
        logger.info("dataset %s: %d training pairs ask a held-out prompt; left out of training", name,
                    len(train) - len(kept))
    train = kept[: config.train_size]
    require_pairs(config, len(train), True, name)

    def shaped(rows: list[dict]) -> list[dict]:
        return [{**row, "prompt": shape_prompt(row["prompt"], config)} for row in rows]

    return PairData(shaped(train), shaped(held_out), name)


def require_pairs(config: VRPOConfig, rows: int, test_split: bool, name: str) -> None:
    """Refuse what a source of `rows` training pairs (with a test split of its own, or eval_size of them to hold
    out) rules out: too few pairs for eval_size and prompts_per_step, and rollout_actors or rollout_server."""
    for key in ("rollout_actors", "rollout_server"):
        if getattr(config, key):
            raise ValueError(f"{key} samples on-policy pairs; dataset {name} holds preference pairs, so there is "
                             "nothing to sample (unset one of them)")
    held = 0 if test_split else config.eval_size
    if rows <= held:
        raise ValueError(f"dataset {name}: {rows} pairs, not more than eval_size {held}, and no split "
                         f"{config.dataset_test_split!r} to check on; lower eval_size or give a test split")
    training = min(rows - held, config.train_size or rows)
    if config.prompts_per_step > training:
        raise ValueError(f"{config.prompts_per_step} pairs per step (prompts_per_step) but the dataset has only "
                         f"{training} training pairs")


def pair_rows(dataset: Dataset, name: str) -> list[dict]:
    """The rows of a preference dataset, with the implicit prompt of conversational pairs (the shared first turns of
    `chosen` and `rejected`) split off (trl's `maybe_extract_prompt`)."""
    from trl.data_utils import maybe_extract_prompt

    require_columns(dataset, ["chosen", "rejected"], f"dataset {name}")
    if len(dataset) == 0:
        raise ValueError(f"dataset {name} has no rows")
    if not isinstance(dataset[0]["chosen"], str):
        dataset = dataset.map(maybe_extract_prompt, desc="splitting off the shared prompt turns")
    require_columns(dataset, ["prompt", "chosen", "rejected"], f"dataset {name}")
    return list(dataset)


def fit_pairs(data: PairData, tokenizer, response_length: int, config: VRPOConfig) -> PairData:
    """`data` without the pairs whose responses do not fit `response_length` (counted in the log); conversations
    are refused for a tokenizer without a chat template."""
    if getattr(tokenizer, "chat_template", None) is None and (
            is_conversational(data.train) or is_conversational(data.held_out)):
        raise ValueError(f"dataset {data.name}: the pairs' prompts are conversations (chat, system_prompt, or "
                         "chat-message rows) but the model's tokenizer has no chat template; use text prompts or an "
                         "instruct model")
    train = _fitting(data.train, tokenizer, response_length, data.name)
    held_out = _fitting(data.held_out, tokenizer, response_length, f"{data.name} (held out)")
    require_pairs(config, len(train), True, data.name)
    return PairData(train, held_out, data.name)


def _fitting(rows: list[dict], tokenizer, response_length: int, name: str) -> list[dict]:
    kept = [row for row, fit in zip(rows, fitting_pairs(tokenizer, rows, response_length)) if fit]
    if len(kept) < len(rows):
        logger.warning("dataset %s: %d of %d pairs have a response longer than gen_length=%d (+1 EOS) and are "
                       "dropped", name, len(rows) - len(kept), len(rows), response_length)
    if not kept:
        raise ValueError(f"dataset {name}: no pair fits gen_length={response_length}; raise gen_length")
    return kept


def _has_pairs(dataset: Dataset, name: str) -> bool:
    """Whether `dataset`'s rows are preference pairs (refused when they have `chosen` or `rejected`, not both)."""
    found = {"chosen", "rejected"} & set(dataset.column_names)
    if found:
        require_columns(dataset, ["chosen", "rejected"], f"dataset {name}")
    return bool(found)


@torch.no_grad()
def held_out_pairs(model, rows: list[dict], gen_length: int, estimator: PreferenceEstimator, config: VRPOConfig,
                   frozen) -> dict:
    """VRPO's loss, mean score and implicit accuracy (the fraction of pairs scored above 0) on the held-out pairs,
    with noise drawn from a generator seeded alike at every check, so that checks compare."""
    generator = torch.Generator(model.device).manual_seed(config.seed)
    sums = {"loss": 0.0, "score_mean": 0.0, "implicit_accuracy": 0.0}
    model.eval()
    for i in range(0, len(rows), config.micro_batch_pairs):
        part = rows[i : i + config.micro_batch_pairs]
        chosen, rejected = ({k: v.to(model.device) for k, v in batch.items()}
                            for batch in collate_pairs(model.tokenizer, part, gen_length))
        loss, stats = vrpo_loss(model, chosen, rejected, estimator, config.beta, generator=generator, frozen=frozen,
                                draws_per_graph=config.draws_per_graph)
        share = len(part) / len(rows)
        sums["loss"] += loss.item() * share
        sums["score_mean"] += stats["score_mean"] * share
        sums["implicit_accuracy"] += stats["implicit_accuracy"] * share
    model.train()
    logger.info("held-out pairs: loss %.4f, implicit accuracy %.3f", sums["loss"], sums["implicit_accuracy"])
    return {f"eval/{name}": value for name, value in sums.items()}


class VRPOTrainer(RLTrainer):
    """VRPO in TRL's shape (`dlm_rl.trainers.api`): `VRPOTrainer(model, args=VRPOConfig(...),
    train_dataset=pairs).train()`, or prompts and `reward_funcs` for on-policy pairs."""

    config_class = VRPOConfig
    run = staticmethod(run)
