"""Reward functions with TRL's signature `fn(prompts, completions, **columns) -> list[float | None]`."""


def completion_text(completion) -> str:
    """A completion as text: a string, or the content of the last message of a chat-message list."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion or ""
