"""Reward functions with TRL's signature `fn(prompts, completions, **columns) -> list[float | None]`."""
