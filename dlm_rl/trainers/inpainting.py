"""IGPO's inpainting (*Inpainting-Guided Policy Optimization for Diffusion Large Language Models*, arXiv 2509.10396).

When every sampled answer to a prompt is wrong, its group gives no signal. IGPO samples part of that group again
with some tokens of the prompt's reference solution (its `completion` column) already in the canvas, and keeps
the regenerated answers that come out right in place of the wrong ones. The injected tokens are never trained
(`dlm_rl.sampling.sampler.generate`, `hints`): only what the policy drew around them is. docs/algorithms.md lists
the choices made here.
"""

from __future__ import annotations

import torch

from dlm_rl import distributed


def reference_hint(tokenizer, completion, gen_length: int, fraction: float, generator: torch.Generator) -> list[int]:
    """`gen_length` token ids: a random `fraction` of the reference solution's tokens (and its EOS) at their own
    positions, −1 elsewhere. `completion` is text, or chat messages (TRL's conversational format: their contents)."""
    if not isinstance(completion, str):
        completion = "".join(message["content"] for message in completion)
    ids = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:gen_length]
    chosen = torch.randperm(len(ids), generator=generator)[: round(fraction * len(ids))].tolist()
    hint = [-1] * gen_length
    for position in chosen:
        hint[position] = ids[position]
    return hint


def inpaint_failed_groups(engine, trajectories: list, config, sampler, tokenizer,
                          generator: torch.Generator) -> tuple[list, dict]:
    """`trajectories` with the right answers of hinted regenerations in place of wrong ones, for every prompt whose
    scored answers all earned ≤ 0; and the step's counts (summed over ranks)."""
    failed = []  # (trajectory, the prompt's index, its dataset row)
    for t, trajectory in enumerate(trajectories):
        total = trajectory.rewards["total"]
        for prompt in sorted(set(trajectory.prompt_index)):
            scores = [total[i] for i, p in enumerate(trajectory.prompt_index) if p == prompt]
            if all(score is not None and score <= 0 for score in scores):
                row = trajectory.rows[trajectory.prompt_index.index(prompt)]
                failed.append((t, prompt, row))
    again = max(1, round(config.igpo_share * config.num_generations))
    counts = {"groups": len(failed), "regenerated": len(failed) * again, "kept": 0}
    if failed:
        hints = [reference_hint(tokenizer, row["completion"], sampler.gen_length,
                                config.igpo_hint_min + (config.igpo_hint_max - config.igpo_hint_min)
                                * float(torch.rand((), generator=generator)), generator)
                 for _, _, row in failed for _ in range(again)]
        regenerated = engine.generate([row for _, _, row in failed], again, sampler, hints=hints)
        trajectories = list(trajectories)
        for new in regenerated:
            for j, (request, sample) in enumerate(zip(new.prompt_index, new.sample_index)):
                score = new.rewards["total"][j]
                if score is None or score <= 0:
                    continue
                t, prompt, _ = failed[request]
                old = trajectories[t]
                rows = [i for i, p in enumerate(old.prompt_index) if p == prompt]
                trajectories[t] = old.with_rows([rows[sample]], new, [j])
                counts["kept"] += 1
    counts = distributed.all_sum(counts)
    return trajectories, {f"igpo/{name}": value for name, value in counts.items()}
