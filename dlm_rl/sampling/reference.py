"""Reference sampler with LLaDA semantics: blocks left to right, a fixed number of tokens committed per step.

Per step, every masked position of the current block gets a candidate token (greedy, or Gumbel-max at
temperature T in float64); the k candidates with the highest confidence (softmax probability of the candidate;
or random scores for random remasking) are committed, the rest stay masked. Batched: all rows step together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm_rl.sampling.config import SamplerConfig


@dataclass
class SampleOutput:
    response_ids: torch.Tensor  # [B, R]
    step_map: torch.Tensor  # [B, R]: global step at which each response token was committed
    nfe: int  # forward passes used


def tokens_per_step(masked_count: int, steps: int) -> list[int]:
    """Split a block's masked tokens over its steps as evenly as possible, earlier steps taking the remainder."""
    base, extra = divmod(masked_count, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def sample_tokens(logits: torch.Tensor, temperature: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens and their confidence (softmax probability of the candidate under the plain logits)."""
    logits = logits.double()  # float32 Gumbel noise truncates the tail and biases samples
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        tokens = (logits / temperature + gumbel).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    confidence = logits.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, confidence


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Fill a canvas of config.gen_length masks after each left-padded prompt ([B, P] ids and padding mask)."""
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    mask_id = model.mask_token_id
    canvas = torch.full((batch, config.gen_length), mask_id, dtype=torch.long, device=device)  # [B, R]
    x = torch.cat([prompt_ids, canvas], dim=1)  # [B, P+R]
    attention_mask = torch.cat([prompt_mask, torch.ones_like(canvas)], dim=1)
    step_map = torch.full((batch, config.gen_length), -1, dtype=torch.long, device=device)
    steps_per_block = config.steps // config.num_blocks
    step = 0
    for block in range(config.num_blocks):
        lo = prompt_len + block * config.block_length
        hi = lo + config.block_length
        for k in tokens_per_step(config.block_length, steps_per_block):
            if k == 0:
                continue
            logits = model(x, attention_mask).logits[:, lo:hi]  # [B, block, V]
            tokens, confidence = sample_tokens(logits, config.temperature, generator)
            if config.remasking == "random":
                confidence = torch.rand(confidence.shape, generator=generator, device=device, dtype=torch.float64)
            still_masked = x[:, lo:hi] == mask_id  # [B, block]
            confidence = confidence.masked_fill(~still_masked, float("-inf"))
            chosen = torch.zeros_like(still_masked)
            chosen.scatter_(1, confidence.topk(k, dim=-1).indices, True)
            chosen &= still_masked
            x[:, lo:hi] = torch.where(chosen, tokens, x[:, lo:hi])
            step_map[:, lo - prompt_len : hi - prompt_len][chosen] = step
            step += 1
    return SampleOutput(response_ids=x[:, prompt_len:], step_map=step_map, nfe=step)
