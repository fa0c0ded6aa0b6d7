"""An LLM judge as a reward: a served model grades each (prompt, completion) on a rubric (docs/serving.md).

`LLMJudge(base_url, model)` is a reward with TRL's signature `fn(prompts, completions, **columns)`: it sends each
pair to the chat completions route of an OpenAI-compatible server (vLLM, SGLang, others), a few at a time, and
parses the reply. The rubric is a template with `{prompt}`, `{completion}` and `{max_score}`.

The parsing rule: the reply's first number is the score; it must lie in [0, max_score] and is divided by
max_score, so rewards lie in [0, 1]. A reply with no number, or with a number outside that range, gives None (no
score: the sample counts as 0 in the total and a warning quotes the reply), never a guess.

The judge answers greedily by default (`temperature` 0). Identical requests (same model, rubric, prompt and
completion) are then sent once: the cache keeps `cache_size` replies, and `cache_hits` and `requests` count. A judge
that samples (`temperature` > 0) gives draws, which are never cached. A request that gets no reply within `timeout`
seconds is retried `retries` times with exponential backoff (`dlm_rl.serving.Endpoint`); after that the call raises
ServerError, which fails the reward's call (the trainers count it, see `dlm_rl.reward_functions`). Nothing logged
names the URL or the key.

In a recipe, `reward_funcs: [rewards.judge:judge]` uses the judge at DLM_RL_JUDGE_URL (required), with the model
DLM_RL_JUDGE_MODEL (default: the server's first), the key in DLM_RL_JUDGE_API_KEY (optional) and the temperature
in DLM_RL_JUDGE_TEMPERATURE (default 0).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import re
import threading

from dlm_rl.serving import Endpoint, ServerError, settings_from_environment

logger = logging.getLogger(__name__)

RUBRIC = """Rate the response to the request below for correctness and helpfulness, on a scale from 0 (useless or \
wrong) to {max_score} (fully correct and helpful). Reply with the number only.

Request:
{prompt}

Response:
{completion}"""

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_score(reply: str, max_score: float) -> float | None:
    """The reply's first number divided by max_score, or None when there is none or it lies outside [0, max_score]."""
    match = NUMBER.search(reply or "")
    if match is None:
        return None
    value = float(match.group())
    return value / max_score if 0 <= value <= max_score else None


def as_text(message) -> str:
    """A prompt or completion as text: a string as it is, chat messages as 'role: content' lines (one message: its
    content)."""
    if isinstance(message, str):
        return message
    if isinstance(message, list) and all(isinstance(m, dict) and "content" in m for m in message):
        if len(message) == 1:
            return str(message[0]["content"])
        return "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in message)
    raise TypeError(f"a prompt or completion must be text or chat messages, got {type(message).__name__}")


class LLMJudge:
    """A reward that asks a served model to grade each completion (see the module docstring)."""

    def __init__(self, base_url: str, model: str | None = None, *, rubric: str = RUBRIC, max_score: float = 10,
                 api_key: str | None = None, timeout: float = 30.0, retries: int = 2, concurrency: int = 8,
                 cache_size: int = 10000, max_tokens: int = 8, temperature: float = 0.0):
        missing = [key for key in ("{prompt}", "{completion}") if key not in rubric]
        if missing:
            raise ValueError(f"the rubric must contain {' and '.join(missing)}")
        if not 0 < max_score < float("inf"):
            raise ValueError(f"max_score must be positive, got {max_score}")
        if concurrency < 1 or cache_size < 0 or max_tokens < 1:
            raise ValueError("concurrency and max_tokens must be at least 1, cache_size at least 0")
        if not 0 <= temperature < float("inf"):
            raise ValueError(f"temperature must be 0 or more, got {temperature}")
        self.endpoint = Endpoint(base_url, api_key=api_key, timeout=timeout, retries=retries, name="judge")
        self.model = model or self.endpoint.models()[0]
        self.rubric, self.max_score, self.max_tokens = rubric, max_score, max_tokens
        self.concurrency, self.temperature = concurrency, temperature
        self.cache_size = cache_size if temperature == 0 else 0
        self.cache: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.cache_hits = self.requests = 0
        self.__name__ = "llm_judge"

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        asks = [self.rubric.format(prompt=as_text(p), completion=as_text(c), max_score=f"{self.max_score:g}")
                for p, c in zip(prompts, completions, strict=True)]
        replies = self._replies(asks)
        scores = []
        for i, reply in enumerate(replies):
            score = parse_score(reply, self.max_score)
            if score is None:
                logger.warning("judge: no score in [0, %g] in the reply for sample %d (no reward): %r",
                               self.max_score, i, reply[:80])
            scores.append(score)
        return scores

    def _replies(self, asks: list[str]) -> list[str]:
        """The judge's reply to each ask, each distinct uncached ask sent once (every ask when sampling); an ask
        answered from the cache, or repeated within the batch, counts as a cache hit."""
        sampling = self.temperature > 0
        with self.lock:
            known = {} if sampling else {a: self.cache[a] for a in set(asks) if a in self.cache}
            for a in known:
                self.cache.move_to_end(a)
        new = asks if sampling else [a for a in dict.fromkeys(asks) if a not in known]
        with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, max(1, len(new)))) as pool:
            replies = list(pool.map(self._ask, new))
        with self.lock:
            self.requests += len(new)
            self.cache_hits += len(asks) - len(new)
            if not sampling:
                self.cache.update(zip(new, replies))
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        if sampling:
            return replies
        fresh = dict(zip(new, replies))
        return [known[a] if a in known else fresh[a] for a in asks]

    def _ask(self, ask: str) -> str:
        reply = self.endpoint.post("/chat/completions", {
            "model": self.model, "messages": [{"role": "user", "content": ask}],
            "max_tokens": self.max_tokens, "temperature": self.temperature})
        try:
            return str(reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"judge: a chat reply without a message: {str(reply)[:200]}") from None

    def close(self) -> None:
        self.endpoint.close()


_JUDGE: LLMJudge | None = None


def judge(prompts: list, completions: list, **columns) -> list[float | None]:
    """The recipe reward: the LLMJudge at DLM_RL_JUDGE_URL (see the module docstring)."""
    global _JUDGE
    if _JUDGE is None:
        _JUDGE = LLMJudge(**settings_from_environment("DLM_RL_JUDGE", "rewards.judge:judge"),
                          temperature=float(os.environ.get("DLM_RL_JUDGE_TEMPERATURE") or 0))
    return _JUDGE(prompts, completions)
