"""ServedEngine: rollouts from a server's completions route (vLLM, SGLang, others; docs/serving.md).

A server returns text and token ids, not how each token was decoded, so its trajectories have no step map and no
per-step log-probabilities (`step_map` and `log_probs` are None). They serve the methods that re-mask completions
themselves (diffu-GRPO, coupled, random masking, the sequence-level and ratio-free methods, on-policy VRPO); the
trainers refuse it for the methods that train on visited states.

Each (prompt, sample) row is its own request with its own seed, derived from the chunk's seed, so rows of the same
prompt differ and a rerun asks for the same samples (whether the server honours seeds is the server's matter).
`sync_weights(model)` saves the model's LoRA adapter to `adapter_dir/v{N}`, loads it into the server under the
name `{model name}-{engine id}-v{N}` (vLLM's runtime LoRA loading, on a server started with --enable-lora; the
random engine id keeps two runs on one server apart), unloads the one before, and from then on requests name the
new adapter: every trajectory carries the version that produced it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable

import numpy as np
import torch

from dlm_rl.data.collate import encode_prompt, left_pad
from dlm_rl.rollout.engine import Chunk, RolloutEngine
from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.trajectory import Trajectory
from dlm_rl.serving import Endpoint, ServerError

logger = logging.getLogger(__name__)

FINISH_REASONS = {"stop": "eos", "length": "length"}


class ServedEngine(RolloutEngine):
    """Rollouts from the completions route at `base_url` (the OpenAI API root), serving the policy's base weights
    as `model`; `tokenizer` is the policy's (prompts are sent as its token ids, replies read as its ids)."""

    def __init__(self, base_url: str, tokenizer, *, model: str = "base", adapter_dir: str | None = None,
                 api_key: str | None = None, timeout: float = 300.0, retries: int = 2, concurrency: int = 16,
                 rows_per_chunk: int = 64, seed: int = 0, rewards: Callable | None = None, reward_threads: int = 2):
        super().__init__(rows_per_chunk=rows_per_chunk, seed=seed, rewards=rewards, reward_threads=reward_threads)
        self.endpoint = Endpoint(base_url, api_key=api_key, timeout=timeout, retries=retries, name="rollout server")
        served = self.endpoint.models()
        if model not in served:
            raise ValueError(f"the rollout server serves {served}, not {model!r}")
        self.tokenizer, self.base_model, self.served_model = tokenizer, model, model
        self.concurrency, self.engine_id = concurrency, uuid.uuid4().hex[:8]
        self.own_adapter_dir = adapter_dir is None
        self.adapter_dir = adapter_dir or tempfile.mkdtemp(prefix="dlm_rl_adapters_")

    def _run(self, chunks: list[Chunk], config: SamplerConfig, done: Callable[[Trajectory], None]) -> list[Trajectory]:
        trajectories = []
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            for chunk in chunks:
                if chunk.hints is not None and any(h is not None for h in chunk.hints):
                    raise ValueError("a served engine cannot inpaint (hints): the server decodes on its own")
                prompts = [encode_prompt(self.tokenizer, p) for p in chunk.prompts]
                seeds = np.random.SeedSequence(chunk.seed).generate_state(len(prompts), dtype=np.uint32) >> 1
                choices = list(pool.map(self._complete, prompts, seeds.tolist(), [config] * len(prompts)))
                trajectory = self._trajectory(prompts, choices, config)
                trajectory.prompt_index = list(chunk.prompt_index)
                trajectory.sample_index = list(chunk.sample_index)
                done(trajectory)
                trajectories.append(trajectory)
        return trajectories

    def _complete(self, prompt: list[int], seed: int, config: SamplerConfig) -> dict:
        choices = self.endpoint.completions({
            "model": self.served_model, "prompt": [prompt], "max_tokens": config.gen_length,
            "temperature": config.temperature, "seed": seed, "return_token_ids": True})
        if len(choices) != 1:
            raise ServerError(f"rollout server: {len(choices)} completions for one prompt")
        (choice,) = choices
        ids = choice.get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids) or len(ids) > config.gen_length:
            raise ServerError("rollout server: a completion without its token ids (vLLM returns them with "
                              f"return_token_ids): {str(choice)[:200]}")
        return choice

    def _trajectory(self, prompts: list[list[int]], choices: list[dict], config: SamplerConfig) -> Trajectory:
        from dlm_rl.evaluation import decode_responses

        eos, length = self.tokenizer.eos_token_id, config.gen_length
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        response = torch.full((len(prompts), length), eos, dtype=torch.long)
        sampled = torch.zeros(len(prompts), length, dtype=torch.bool)
        for b, choice in enumerate(choices):
            tokens = choice["token_ids"]
            response[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            sampled[b, : len(tokens)] = True
        trajectory = Trajectory(
            prompt_ids=ids, prompt_mask=mask, response_ids=response, step_map=None, log_probs=None, sampled=sampled,
            nfe=sampled.sum(1), block_length=length, block_offset=torch.zeros(len(prompts), dtype=torch.long),
            finish_reason=[FINISH_REASONS.get(c.get("finish_reason"), "length") for c in choices], eos_token_id=eos,
            weight_version=self.version,
        )
        trajectory.completions = decode_responses(self.tokenizer, response)
        return trajectory

    def sync_weights(self, model, *, full: bool = False) -> int:
        """Load `model`'s LoRA adapter into the server (see the module docstring); full weights are not supported."""
        if full or not hasattr(model.model, "peft_config"):
            raise ValueError("a served engine takes the policy's LoRA adapter only (use_lora: true); full fine-tuning "
                             "would need the whole weights reloaded into the server")
        version = self.version + 1
        path = os.path.join(self.adapter_dir, f"v{version}")
        model.save_pretrained(path)
        name = f"{self.base_model}-{self.engine_id}-v{version}"
        self.endpoint.load_lora_adapter(name, os.path.abspath(path))
        if self.served_model != self.base_model:
            self.endpoint.unload_lora_adapter(self.served_model)
            shutil.rmtree(os.path.join(self.adapter_dir, f"v{self.version}"), ignore_errors=True)
        self.served_model, self.version = name, version
        return version

    def close(self) -> None:
        """Unload this engine's adapter from the server (if it is still up), then remove the adapters' files when
        the engine made their directory."""
        super().close()
        if self.served_model != self.base_model:
            try:
                self.endpoint.unload_lora_adapter(self.served_model)
            except ServerError as error:
                logger.warning("could not unload adapter %s from the rollout server: %s", self.served_model, error)
        self.endpoint.close()
        if self.own_adapter_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
