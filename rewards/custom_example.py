"""An example of a user's own reward, loaded from a recipe as `rewards/custom_example.py:shorter_is_better`.

Any file works the same way: a function with TRL's signature; dataset columns arrive as keyword arguments.
"""

from rewards import completion_text


def shorter_is_better(prompts, completions, max_chars=None, **columns) -> list[float]:
    """1 for an empty completion, falling linearly to 0 at `max_chars` (a dataset column, default 200)."""
    limits = max_chars or [200] * len(completions)
    return [max(0.0, 1.0 - len(completion_text(c)) / limit) for c, limit in zip(completions, limits)]
