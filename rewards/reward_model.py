"""A served reward model (a scalar head) as a reward (docs/serving.md).

`ServedRewardModel(base_url, model)` is a reward with TRL's signature: it sends each (prompt, completion) to the
pooling route of a vLLM server running a sequence-classification reward model with one output
(`scripts/serve_vllm.sh start RM_DIR PORT -- --runner pooling`) and returns the head's raw score (no sigmoid).
A conversation (chat-message prompt) goes as messages, which the server renders with the reward model's own chat
template, the completion as the assistant's turn; a text prompt goes as prompt + completion. Up to `concurrency`
requests at a time; timeouts and retries as `dlm_rl.serving.Endpoint`'s, and the same clear errors.

In a recipe, `reward_funcs: [rewards.reward_model:reward_model]` uses the server at DLM_RL_REWARD_MODEL_URL
(required), the model DLM_RL_REWARD_MODEL (default: the server's first) and the key in DLM_RL_REWARD_MODEL_API_KEY
(optional).
"""

from __future__ import annotations

import concurrent.futures
import math

from dlm_rl.serving import Endpoint, ServerError, settings_from_environment


class ServedRewardModel:
    """A reward read from a served reward model's scalar head (see the module docstring)."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 2, concurrency: int = 8):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        api = Endpoint(base_url, api_key=api_key, timeout=timeout, retries=retries, name="reward model")
        self.model = model or api.models()[0]
        api.close()
        # vLLM serves the pooling route beside the OpenAI API root, not under it
        self.endpoint = Endpoint(base_url.rstrip("/").removesuffix("/v1"), api_key=api_key, timeout=timeout,
                                 retries=retries, name="reward model")
        self.concurrency = concurrency
        self.__name__ = "reward_model"

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        requests = [self._request(p, c) for p, c in zip(prompts, completions, strict=True)]
        with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, max(1, len(requests)))) as pool:
            return list(pool.map(self._score, requests))

    def _request(self, prompt, completion) -> dict:
        text = completion[0]["content"] if isinstance(completion, list) else completion
        if isinstance(prompt, list):
            return {"messages": [*prompt, {"role": "assistant", "content": text}]}
        return {"input": prompt + text}

    def _score(self, request: dict) -> float:
        reply = self.endpoint.post("/pooling", {"model": self.model, "use_activation": False, **request})
        try:
            (value,) = reply["data"][0]["data"]
            value = float(value)
        except (KeyError, IndexError, TypeError, ValueError):
            raise ServerError("reward model: a pooling reply without one score (is it a reward model with one output, "
                              f"served with --runner pooling?): {str(reply)[:200]}") from None
        if not math.isfinite(value):
            raise ServerError(f"reward model: a score that is not finite: {value}")
        return value

    def close(self) -> None:
        self.endpoint.close()


_MODEL: ServedRewardModel | None = None


def reward_model(prompts: list, completions: list, **columns) -> list[float]:
    """The recipe reward: the ServedRewardModel at DLM_RL_REWARD_MODEL_URL (see the module docstring)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = ServedRewardModel(**settings_from_environment("DLM_RL_REWARD_MODEL",
                                                               "rewards.reward_model:reward_model"))
    return _MODEL(prompts, completions)
