"""Sample completions for a dataset and score them: greedy accuracy, pass@1 and pass@k at temperature 1."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from dlm_rl.data.collate import encode_prompt, left_pad
from dlm_rl.data.tasks import score
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.sampler import generate
from dlm_rl.sampling.trajectory import Trajectory


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
) -> list[Trajectory]:
    """Sample one response per prompt (text or chat messages), in batches; one Trajectory per batch."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    tokenizer = model.tokenizer
    trajectories = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None, leave=False):
        batch = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
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


def evaluate(
    model,
    dataset,
    task: str,
    *,
    gen_length: int,
    samples: int = 8,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    sampler: dict | None = None,
    rewards=None,
) -> dict:
    """Greedy accuracy, and pass@1 / pass@`samples` from `samples` completions per prompt at temperature 1.

    A completion counts as correct when its score is 1 (every test passes, for code). `sampler` holds further
    SamplerConfig fields (threshold, cache, block_length, ...) for both runs. `rewards` (a `Rewards`) also
    scores the greedy completions, with the dataset's other columns passed by name: their means are reported.
    """
    was_training = model.training
    model.eval()
    prompts, rows = list(dataset["prompt"]), list(dataset)
    greedy = complete(
        model,
        prompts,
        SamplerConfig(gen_length=gen_length, **{**(sampler or {}), "temperature": 0.0}),
        batch_size=batch_size,
        progress="greedy" if progress else None,
    )
    greedy_correct = [score(task, text, row) >= 1.0 for text, row in zip(greedy, rows)]
    result = {"n": len(rows), "greedy_accuracy": sum(greedy_correct) / len(rows), "examples": greedy[:3]}
    if rewards is not None:
        columns = {name: list(dataset[name]) for name in dataset.column_names if name != "prompt"}
        scores = rewards(prompts, greedy, columns)
        result["rewards"] = {
            name: sum(s for s in values if s is not None) / max(1, sum(s is not None for s in values))
            for name, values in scores.items()
            if name != "errors"
        }
    if samples:
        generator = torch.Generator(model.device).manual_seed(seed)
        sampled = complete(
            model,
            [p for p in prompts for _ in range(samples)],
            SamplerConfig(gen_length=gen_length, **{**(sampler or {}), "temperature": 1.0}),
            batch_size=batch_size,
            generator=generator,
            progress=f"T=1 x{samples}" if progress else None,
        )
        counts = [
            sum(score(task, sampled[i * samples + j], row) >= 1.0 for j in range(samples))
            for i, row in enumerate(rows)
        ]
        result["pass@1"] = sum(pass_at_k(samples, c, 1) for c in counts) / len(rows)
        result[f"pass@{samples}"] = sum(pass_at_k(samples, c, samples) for c in counts) / len(rows)
    model.train(was_training)
    return result
