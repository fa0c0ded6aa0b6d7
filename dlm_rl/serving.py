"""A client of an OpenAI-compatible server (vLLM, SGLang and others, run as separate processes: docs/serving.md).

`Endpoint` POSTs JSON with a timeout per request and a bounded number of retries with exponential backoff. It
retries what may pass (no connection, a timeout, HTTP 429 and 5xx) and raises `ServerError` at once on what will
not (another HTTP error, a reply that is not the JSON asked for). Nothing it logs or raises names the URL or the
API key: URLs can carry credentials, and logs travel.
"""

from __future__ import annotations

import logging
import os
import time

import httpx

logger = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server cannot give what was asked: it is down or too slow after every retry, refused the request, or
    replied with something other than the expected JSON."""


class Endpoint:
    """`base_url` is the server's OpenAI API root (e.g. http://127.0.0.1:8000/v1); `name` labels it in messages."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, name: str = "server"):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"{name}: the URL must start with http:// or https://")
        if not 0 < timeout < float("inf"):
            raise ValueError(f"{name}: timeout must be a positive number of seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"{name}: retries must be 0 or more, got {retries}")
        self.name, self.timeout, self.retries, self.backoff = name, timeout, retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __repr__(self) -> str:  # never the URL or the key
        return f"Endpoint({self.name!r})"

    def post(self, path: str, payload: dict) -> dict:
        """The JSON reply to POST `path`; at most 1 + retries attempts, each within `timeout` seconds."""
        return self._request("POST", path, payload)

    def get(self, path: str) -> dict:
        return self._request("GET", path, None)

    def _request(self, method: str, path: str, payload: dict | None) -> dict:
        for attempt in range(self.retries + 1):
            try:
                reply = self.client.request(method, path, json=payload)
            except httpx.TimeoutException:
                why = f"no reply within {self.timeout:g} s"
            except httpx.TransportError as error:
                why = f"cannot reach it ({type(error).__name__})"
            else:
                if reply.status_code == 429 or reply.status_code >= 500:
                    why = f"HTTP {reply.status_code}"
                elif reply.status_code >= 400:
                    raise ServerError(f"{self.name} refused {method} {path}: HTTP {reply.status_code}: "
                                      f"{reply.text[:300]}")
                else:
                    try:
                        return reply.json()
                    except ValueError:
                        raise ServerError(f"{self.name} replied to {method} {path} with something other than JSON: "
                                          f"{reply.text[:100]!r}") from None
            if attempt == self.retries:
                raise ServerError(f"{self.name}: {method} {path} failed {attempt + 1} times (last: {why})")
            delay = self.backoff * 2**attempt
            logger.warning("%s: %s %s: %s; retry %d of %d in %.1f s", self.name, method, path, why, attempt + 1,
                           self.retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def models(self) -> list[str]:
        """The served model names (`GET /models`)."""
        reply = self.get("/models")
        try:
            return [m["id"] for m in reply["data"]]
        except (KeyError, TypeError):
            raise ServerError(f"{self.name}: /models replied without a list of models: {str(reply)[:200]}") from None

    def completions(self, payload: dict) -> list[dict]:
        """The choices of `POST /completions`, in prompt order (the server may return them in any order)."""
        reply = self.post("/completions", payload)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) and "index" in c for c in choices):
            raise ServerError(f"{self.name}: /completions replied without choices: {str(reply)[:200]}")
        return sorted(choices, key=lambda c: c["index"])

    def prompt_log_probs(self, model: str, token_ids: list[list[int]]) -> list[list[float]]:
        """Each sequence's log-probability of tokens 1.. given the tokens before them (the server's prompt
        log-probabilities: `prompt_logprobs`, a vLLM extension)."""
        choices = self.completions({"model": model, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0,
                                    "prompt_logprobs": 0})
        if len(choices) != len(token_ids):
            raise ServerError(f"{self.name}: {len(choices)} choices for {len(token_ids)} prompts")
        result = []
        for ids, choice in zip(token_ids, choices):
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list) or len(entries) != len(ids):
                raise ServerError(f"{self.name}: no prompt log-probabilities for every prompt token (does the server "
                                  "support prompt_logprobs? vLLM does)")
            try:
                result.append([float(entry[str(token)]["logprob"]) for token, entry in zip(ids[1:], entries[1:])])
            except (KeyError, TypeError, ValueError):
                raise ServerError(f"{self.name}: malformed prompt log-probabilities: {str(entries[:3])[:200]}") \
                    from None
        return result

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load the PEFT adapter directory `path` into the server as model `name` (vLLM's runtime LoRA loading:
        the server runs with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
        self._plain("/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_lora_adapter(self, name: str) -> None:
        self._plain("/unload_lora_adapter", {"lora_name": name})

    def _plain(self, path: str, payload: dict) -> None:
        """POST to an endpoint that replies with plain text (vLLM's adapter routes)."""
        try:
            reply = self.client.post(path, json=payload)
        except httpx.HTTPError as error:
            raise ServerError(f"{self.name}: POST {path} failed ({type(error).__name__})") from None
        if reply.status_code != 200:
            raise ServerError(f"{self.name} refused POST {path}: HTTP {reply.status_code}: {reply.text[:300]}")

    def close(self) -> None:
        self.client.close()


def settings_from_environment(prefix: str, reward: str) -> dict:
    """`base_url`, `model` and `api_key` of the server a recipe reward uses, from PREFIX_URL (required),
    PREFIX_MODEL and PREFIX_API_KEY (optional; an unset model is the server's first)."""
    url = os.environ.get(f"{prefix}_URL")
    if not url:
        raise ValueError(f"{reward} needs {prefix}_URL, its server's OpenAI API root (e.g. the URL "
                         "scripts/serve_vllm.sh start prints)")
    return {"base_url": url, "model": os.environ.get(f"{prefix}_MODEL") or None,
            "api_key": os.environ.get(f"{prefix}_API_KEY") or None}
