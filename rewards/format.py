"""Format rewards: does a completion have the shape asked for (a boxed answer, a fenced code block, a length)?"""

from __future__ import annotations

import re

from rewards import completion_text

_FENCED_PYTHON = re.compile(r"```(?:python|py)?[ \t]*\n.*?```", re.DOTALL)



def boxed(prompts, completions, **columns) -> list[float]:
    """1.0 where the completion contains a closed `\\boxed{...}`."""
    return [float(_closed_box(completion_text(c))) for c in completions]


def fenced_code(prompts, completions, **columns) -> list[float]:
    """1.0 where the completion contains a closed ```python (or bare ```) block."""
    return [float(bool(_FENCED_PYTHON.search(completion_text(c)))) for c in completions]


def length_within(max_chars: int, min_chars: int = 1):
    """A reward that is 1.0 for completions of min_chars..max_chars characters: `length_within(2000)`."""
    if not 0 <= min_chars <= max_chars:
        raise ValueError(f"length_within needs 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")

    def length_reward(prompts, completions, **columns) -> list[float]:
        return [float(min_chars <= len(completion_text(c)) <= max_chars) for c in completions]

    length_reward.__name__ = f"length_within_{max_chars}"
    return length_reward


def _closed_box(text: str) -> bool:
    start = text.find("\\boxed{")
    while start >= 0:
        depth = 0
        for char in text[start + len("\\boxed") :]:
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth == 0:
                return True
        start = text.find("\\boxed{", start + 1)
    return False
