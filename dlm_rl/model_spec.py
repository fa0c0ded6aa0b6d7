"""Turn the `model:` field of a recipe into a DiffusionLM. It stands above `dlm_rl.models` (it resolves
`testbed:NAME` through the testbed, which trains with the MDM trainer), so loading a model never imports a trainer."""

from __future__ import annotations

import os

import torch

from dlm_rl.models.diffusion_lm import DiffusionLM


def resolve_model(
    spec: str,
    *,
    attention: str = "full",
    block_size: int | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    tiny_hidden_size: int = 128,
    tiny_num_layers: int = 4,
    seed: int = 0,
) -> DiffusionLM:
    """'tiny' → a fresh tiny model; 'smollm2' → SmolLM2-135M-Instruct via A2D (offline); 'testbed:NAME' → a built
    testbed checkpoint; anything else → `dlm_rl.models.load(spec)` (a dlm-rl directory or a dLLM checkpoint).
    `dtype` ('auto' keeps the stored one) names the weights' torch dtype."""
    if spec in ("tiny", "smollm2"):
        model = _built_in(spec, attention, block_size, tiny_hidden_size, tiny_num_layers, seed)
        return model if dtype == "auto" else model.to(getattr(torch, dtype))
    if spec.startswith("testbed:"):
        from dlm_rl.testbed import checkpoint

        spec = checkpoint(spec.removeprefix("testbed:"))
    if not os.path.exists(spec) and "/" not in spec:
        raise ValueError(
            f"model {spec!r} is neither 'tiny', 'smollm2', 'testbed:NAME', an existing path nor a hub name"
        )
    from dlm_rl.models.loading import load

    return load(spec, trust_remote_code=trust_remote_code, dtype=dtype)


def known_tokenizer(spec: str):
    """The tokenizer of the model `spec` names when it is had without loading the model, so that data can be checked
    first: the character tokenizer of 'tiny', the saved one of a dlm-rl directory (a built testbed checkpoint among
    them); None for the others ('smollm2', published checkpoints). Only the character tokenizer refuses a completion
    for its characters (`model_ids`)."""
    if spec == "tiny":
        from dlm_rl.data.tokenizer import char_tokenizer

        return char_tokenizer()
    if spec.startswith("testbed:"):
        from dlm_rl.testbed import checkpoint

        spec = checkpoint(spec.removeprefix("testbed:"))
    from dlm_rl.models.loading import saved_tokenizer

    return saved_tokenizer(spec)


def _built_in(spec, attention, block_size, tiny_hidden_size, tiny_num_layers, seed) -> DiffusionLM:
    if spec == "tiny":
        from dlm_rl.models.tiny import tiny_model

        return tiny_model(
            hidden_size=tiny_hidden_size,
            num_layers=tiny_num_layers,
            intermediate_size=4 * tiny_hidden_size,
            attention=attention,
            block_size=block_size,
            seed=seed,
        )
    from dlm_rl.models.assets import smollm2

    return smollm2(attention=attention, block_size=block_size)
