"""The evaluation harness: sample completions for a benchmark's prompts, score them, and report greedy accuracy,
pass@1 and pass@k at temperature 1 (unbiased estimator), NFE and tokens/s, with one record per completion.

`dlm-rl eval`, the testbed builds and the trainers' periodic held-out check all run `evaluate`. A score is in
[0, 1]; a completion is correct when its score is 1 (every test passes, for code). Code completions run in the
sandbox of `rewards.code`, never in this process.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from dlm_rl.data.collate import encode_prompt, left_pad
from dlm_rl.data.tasks import score
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.sampler import generate
from dlm_rl.sampling.trajectory import Trajectory

SCORE_CHUNK = 64  # completions per scoring call (one progress-bar tick)


def decode_responses(tokenizer, response_ids: torch.Tensor) -> list[str]:
    """Text of each response up to its first EOS (special tokens dropped)."""
    texts = []
    for row in response_ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def rollout(
    model,
    prompts: list,
    config: SamplerConfig,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: str | None = None,
    max_prompt_tokens: int | None = None,
) -> list[Trajectory]:
    """Sample one response per prompt (text or chat messages), in batches; one Trajectory per batch.

    `max_prompt_tokens` keeps only the last that many tokens of a longer prompt."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    tokenizer = model.tokenizer
    trajectories = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None, leave=False):
        batch = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        if max_prompt_tokens is not None:
            batch = [ids[-max_prompt_tokens:] for ids in batch]
        ids, mask = left_pad(batch, tokenizer.pad_token_id)
        trajectories.append(generate(model, ids.to(model.device), mask.to(model.device), config, generator))
    return trajectories


def complete(model, prompts: list, config: SamplerConfig, **kwargs) -> list[str]:
    """One completion (text up to EOS) per prompt; keyword arguments as for `rollout`."""
    trajectories = rollout(model, prompts, config, **kwargs)
    return [text for t in trajectories for text in decode_responses(model.tokenizer, t.response_ids)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_completions(scorer: str, completions: list[str], rows: list[dict], progress: str | None = None
                      ) -> list[float]:
    """Score in [0, 1] of each completion for its dataset row.

    `scorer` 'rewards.math:accuracy': that reward against the row's `answer` (math-verify, in worker processes);
    'rewards.code:pass_rate': that reward for the row's `code_prefix` + the completion's code against its `tests`
    (in the sandbox); anything else: the testbed checker `dlm_rl.data.tasks.score(scorer, ...)`.
    """
    if scorer == "rewards.math:accuracy":
        from rewards.math import accuracy

        def batch(texts, batch_rows):
            return accuracy([r["prompt"] for r in batch_rows], texts, [r["answer"] for r in batch_rows])
    elif scorer == "rewards.code:pass_rate":
        from rewards.code import pass_rate

        def batch(texts, batch_rows):
            return pass_rate(
                [r["prompt"] for r in batch_rows],
                texts,
                tests=[r["tests"] for r in batch_rows],
                entry_point=[r.get("entry_point") for r in batch_rows],
                code_prefix=[r.get("code_prefix") or "" for r in batch_rows],
            )
    else:

        def batch(texts, batch_rows):
            return [score(scorer, t, r) for t, r in zip(texts, batch_rows)]

    scores = []
    chunks = range(0, len(completions), SCORE_CHUNK)
    for start in tqdm(chunks, desc=progress, disable=progress is None, leave=False):
        scores += batch(completions[start : start + SCORE_CHUNK], rows[start : start + SCORE_CHUNK])
    for value, row in zip(scores, rows):
        if value is None:
            raise ValueError(f"{scorer} scorer: problem {row.get('id')!r} has no answer or tests to score against")
    return [float(value) for value in scores]


def evaluate(model, dataset, task: str | None, **kwargs) -> dict:
    """The metrics of `run_evaluation` (same arguments), without the per-completion records."""
    return run_evaluation(model, dataset, task, **kwargs)[0]


def run_evaluation(
    model,
    dataset,
    task: str | None,
    *,
    gen_length: int,
    samples: int = 8,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    sampler: dict | None = None,
    rewards=None,
    truncate_prompts: bool = False,
    pass_k: list[int] | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, records): greedy accuracy, and pass@k for k in `pass_k` (default 1 and `samples`) from `samples`
    completions per prompt at temperature 1, with the mean NFE per completion and tokens/s (canvas tokens over
    sampling time) of each run.

    `dataset` has a `prompt` column and what scorer `task` reads (see `score_completions`); an `id` column names the
    problems in the records. With `task` None (a dataset scored by its rewards alone) there is no accuracy or pass@k:
    only the rewards' means, and `samples` must be 0. `sampler` holds further SamplerConfig fields (threshold, cache, block_length, ...) for
    both runs. `rewards` (a `Rewards`) also scores the greedy completions, with the dataset's other columns passed
    by name: their means are reported. `truncate_prompts` keeps the last tokens of prompts too long for the model's
    context beside `gen_length` (counted in `truncated_prompts`) instead of refusing them.
    A record per completion: problem id, sample index, temperature, prompt, completion, score, correct, NFE and
    finish reason ("eos" or "length").
    """
    if task is None and (samples or rewards is None):
        raise ValueError("a dataset without answers or tests is evaluated by rewards alone, greedily (samples 0)")
    pass_k = sorted(set(pass_k or [1, samples])) if samples else []
    if any(not 1 <= k <= samples for k in pass_k):
        raise ValueError(f"pass@k needs 1 <= k <= samples ({samples}); got k = {pass_k}")
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    rows = list(dataset)
    prompts = [row["prompt"] for row in rows]
    keep, truncated = _prompt_budget(model, prompts, gen_length, truncate_prompts)
    options = {**(sampler or {}), "gen_length": gen_length}
    common = dict(batch_size=batch_size, max_prompt_tokens=keep)

    def label(text: str) -> str | None:
        return text if progress else None

    greedy = _sample(model, prompts, SamplerConfig(**{**options, "temperature": 0.0}), None, label("greedy"), **common)
    result = {"n": len(rows)}
    if task is None:
        records = _records(rows, greedy, [None] * len(rows), samples=1, temperature=0.0)
    else:
        greedy_scores = score_completions(task, greedy["texts"], rows, label("scoring greedy"))
        records = _records(rows, greedy, greedy_scores, samples=1, temperature=0.0)
        result["greedy_accuracy"] = sum(s >= 1.0 for s in greedy_scores) / len(rows)
    if samples:
        generator = torch.Generator(model.device).manual_seed(seed)
        repeated = [p for p in prompts for _ in range(samples)]
        sampled = _sample(model, repeated, SamplerConfig(**{**options, "temperature": 1.0}), generator,
                          label(f"T=1 x{samples}"), **common)
        sampled_rows = [row for row in rows for _ in range(samples)]
        sampled_scores = score_completions(task, sampled["texts"], sampled_rows, label("scoring samples"))
        records += _records(rows, sampled, sampled_scores, samples=samples, temperature=1.0)
        counts = [sum(s >= 1.0 for s in sampled_scores[i * samples : (i + 1) * samples]) for i in range(len(rows))]
        for k in pass_k:
            result[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in counts) / len(rows)
    result["nfe_greedy"] = greedy["nfe"]
    result["tokens_per_s_greedy"] = greedy["tokens_per_s"]
    if samples:
        result["nfe_sampled"] = sampled["nfe"]
        result["tokens_per_s_sampled"] = sampled["tokens_per_s"]
    if truncate_prompts:
        result["truncated_prompts"] = truncated
    result["examples"] = greedy["texts"][:3]
    if rewards is not None:
        columns = {name: list(dataset[name]) for name in dataset.column_names if name != "prompt"}
        scores = rewards(prompts, greedy["texts"], columns)
        result["rewards"] = {
            name: sum(s for s in values if s is not None) / max(1, sum(s is not None for s in values))
            for name, values in scores.items()
            if name != "errors"
        }
    result["seconds"] = round(time.perf_counter() - started, 1)
    model.train(was_training)
    return result, records


def _prompt_budget(model, prompts: list, gen_length: int, truncate: bool) -> tuple[int | None, int]:
    """(tokens to keep of each prompt or None for all, how many prompts are longer) for the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return None, 0
    budget = context - gen_length
    if budget < 1:
        raise ValueError(f"gen_length {gen_length} leaves no room for a prompt in the model's {context} positions")
    over = sum(len(encode_prompt(model.tokenizer, p)) > budget for p in prompts)
    if over and not truncate:
        raise ValueError(
            f"{over} of {len(prompts)} prompts are longer than the {budget} tokens that the model's context of "
            f"{context} positions leaves beside gen_length {gen_length}; lower gen_length, or keep each prompt's "
            f"last {budget} tokens with truncate_prompts (--truncate-prompts)"
        )
    return (budget if over else None), over


def _sample(model, prompts: list, config: SamplerConfig, generator, progress: str | None, **kwargs) -> dict:
    """Texts, per-completion NFE and finish reasons, mean NFE and canvas tokens/s of one sampling run."""
    start = time.perf_counter()
    trajectories = rollout(model, prompts, config, generator=generator, progress=progress, **kwargs)
    seconds = time.perf_counter() - start
    nfe = [int(x) for t in trajectories for x in t.nfe]
    return {
        "texts": [text for t in trajectories for text in decode_responses(model.tokenizer, t.response_ids)],
        "nfes": nfe,
        "finish": [reason for t in trajectories for reason in t.finish_reason],
        "nfe": sum(nfe) / len(nfe),
        "tokens_per_s": round(len(prompts) * config.gen_length / seconds, 1),
    }


def _records(rows: list[dict], run: dict, scores: list[float | None], *, samples: int, temperature: float
             ) -> list[dict]:
    """One record per completion of `run`, which holds `samples` consecutive completions per row."""
    return [
        {
            "id": str(rows[i // samples].get("id", i // samples)),
            "sample": i % samples,
            "temperature": temperature,
            "prompt": rows[i // samples]["prompt"],
            "completion": text,
            "score": scores[i],
            "correct": None if scores[i] is None else scores[i] >= 1.0,
            "nfe": run["nfes"][i],
            "finish_reason": run["finish"][i],
        }
        for i, text in enumerate(run["texts"])
    ]
