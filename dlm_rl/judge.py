"""Measures of unconditional samples: an independent autoregressive judge's perplexity (the testbed's analogue
of the GPT-2-Large judge that distillation papers use), unigram entropy, validity and distinct samples.

`build_judge(task)` trains a tiny causal Llama (next-token loss, transformers Trainer) on the task's training
texts — prompt, completion, EOS — and caches it beside the testbed checkpoints. `judge_perplexity` scores
responses as exp(mean negative log-likelihood per token) given their prompts, each response up to and including
its first EOS; `served_judge_perplexity` is the same measure from a judge served over HTTP (vLLM's prompt
log-probabilities), for judges too large to run beside the models they score.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeSpec:
    task: str = "facts"
    max_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    train_size: int = 50000
    seed: int = 1
    """Differs from the teacher's seed: the judge shares no initialisation with the model it scores."""


def judge_path(spec: JudgeSpec) -> str:
    from dlm_rl.testbed import cache_root

    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache_root(), "testbed", f"{spec.task}-judge-{key}")


def build_judge(spec: JudgeSpec = JudgeSpec(), *, force: bool = False) -> str:
    """Train (unless cached) the judge of `spec.task`; returns its directory (a transformers causal LM)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from dlm_rl.models.tiny import tiny_model
    from dlm_rl.testbed import TASKS

    path = judge_path(spec)
    if os.path.isfile(os.path.join(path, "metrics.json")) and not force:
        return path
    task = TASKS[spec.task]
    backbone = tiny_model(seed=spec.seed)
    model, tokenizer = backbone.model, backbone.tokenizer
    rows = task.dataset("train", spec.train_size, seed=spec.seed)
    encoded = rows.map(lambda row: {"input_ids": _encode(tokenizer, row["prompt"], row["completion"])},
                       remove_columns=rows.column_names)
    args = TrainingArguments(
        output_dir=path, max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, warmup_steps=spec.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=0.01, logging_steps=max(spec.max_steps // 10, 1), save_strategy="no", seed=spec.seed,
        use_cpu=not torch.cuda.is_available(), report_to="none", disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=encoded, data_collator=collator)
    logger.info("%s judge: training a causal LM for %d steps; saving to %s", spec.task, spec.max_steps, path)
    start = time.perf_counter()
    trainer.train()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    held_out = task.dataset("test", 256, seed=spec.seed)
    ids = torch.tensor([_encode(tokenizer, r["prompt"], r["completion"]) for r in held_out])
    prompt_width = len(tokenizer(held_out[0]["prompt"], add_special_tokens=False)["input_ids"])
    perplexity = judge_perplexity(model, ids[:, :prompt_width], torch.ones_like(ids[:, :prompt_width]),
                                  ids[:, prompt_width:], tokenizer.eos_token_id)
    metrics = {"task": spec.task, "steps": spec.max_steps, "train_seconds": round(time.perf_counter() - start, 1),
               "held_out_perplexity": perplexity}
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    logger.info("%s judge: %s", spec.task, metrics)
    return path


def load_judge(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _encode(tokenizer, prompt: str, completion: str) -> list[int]:
    return tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@torch.no_grad()
def judge_perplexity(judge, prompt_ids, prompt_mask, response_ids, eos_id: int, batch_size: int = 64) -> float:
    """exp(mean NLL per response token) under the causal `judge`; each response counts up to and including its
    first EOS (all of it when it has none). Prompts are left padded; responses share one start column."""
    total, count = 0.0, 0
    for i in range(0, len(response_ids), batch_size):
        prompts, mask = prompt_ids[i : i + batch_size], prompt_mask[i : i + batch_size]
        responses = response_ids[i : i + batch_size]
        eos = responses == eos_id
        first_eos = torch.where(eos.any(1), eos.long().argmax(1), responses.shape[1] - 1)
        scored = torch.arange(responses.shape[1], device=responses.device)[None] <= first_eos[:, None]  # [b, R]
        ids = torch.cat([prompts, responses], 1)
        attention = torch.cat([mask, scored.long()], 1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = judge(input_ids=ids, attention_mask=attention, position_ids=positions).logits.double()
        width = prompts.shape[1]
        log_probs = logits[:, width - 1 : -1].log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1)
        total -= float(log_probs[scored].sum())
        count += int(scored.sum())
    return float(torch.exp(torch.tensor(total / count)))


def served_judge_perplexity(endpoint, model: str, prompt_ids, prompt_mask, response_ids, eos_id: int,
                            batch_size: int = 64) -> float:
    """`judge_perplexity` computed by a server (`dlm_rl.serving.Endpoint`) serving the judge as `model`: each
    sample's real prompt tokens and response (up to and including its first EOS) are sent as token ids, and the
    response tokens' log-probabilities are read from the server's prompt log-probabilities."""
    sequences, scored = [], []
    for prompt, mask, response in zip(prompt_ids.tolist(), prompt_mask.tolist(), response_ids.tolist()):
        response = response[: response.index(eos_id) + 1] if eos_id in response else response
        sequences.append([t for t, m in zip(prompt, mask) if m] + response)
        scored.append(len(response))
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i : i + batch_size]
        for log_probs, n in zip(endpoint.prompt_log_probs(model, batch), scored[i : i + batch_size]):
            total -= sum(log_probs[len(log_probs) - n :])
            count += n
    return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))


def unigram_entropy(response_ids: torch.Tensor, eos_id: int) -> float:
    """Mean over samples of the entropy (nats) of each sample's own token frequencies, up to its first EOS; low
    values flag repetitive samples that game perplexity."""
    entropies = []
    for tokens in _until_eos(response_ids, eos_id):
        if not tokens:
            entropies.append(0.0)
            continue
        counts = torch.bincount(torch.tensor(tokens)).double()
        p = counts[counts > 0] / len(tokens)
        entropies.append(float(-(p * p.log()).sum()))
    return sum(entropies) / len(entropies)


def sample_quality(response_ids: torch.Tensor, tokenizer, scorer: str | None = None, rows=None) -> dict:
    """Entropy, distinct fraction and, given a task scorer (`dlm_rl.data.tasks.score`) and the samples' dataset
    rows (unused by unconditional tasks), mean validity of samples."""
    texts = tokenizer.batch_decode(_until_eos(response_ids, tokenizer.eos_token_id))
    result = {"entropy": unigram_entropy(response_ids, tokenizer.eos_token_id),
              "distinct": len(set(texts)) / len(texts)}
    if scorer is not None:
        scores = validities(response_ids, tokenizer, scorer, rows)
        result["validity"] = sum(scores) / len(scores)
    return result


def validities(response_ids: torch.Tensor, tokenizer, scorer: str, rows=None) -> list[float]:
    """Each sample's score under the task scorer `scorer`, its text cut at the first EOS; `rows` are the samples'
    dataset rows (unused by unconditional tasks)."""
    from dlm_rl.data.tasks import score

    texts = tokenizer.batch_decode(_until_eos(response_ids, tokenizer.eos_token_id))
    rows = rows if rows is not None else [{}] * len(texts)
    return [score(scorer, text, row) for text, row in zip(texts, rows)]


def _until_eos(response_ids: torch.Tensor, eos_id: int) -> list[list[int]]:
    return [row[: row.index(eos_id)] if eos_id in row else row for row in response_ids.tolist()]
