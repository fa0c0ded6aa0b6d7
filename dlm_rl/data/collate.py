"""Turn prompt/completion rows into diffusion training batches: left-padded prompt, fixed response canvas.

Every row of a batch is laid out as [pad … pad, prompt, response, eos … eos]: prompts are left-padded so that
all responses start in the same column, and each response is followed by EOS up to `response_length` — the
canvas a sampler will fill, so the model learns where answers end (LLaDA's SFT convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm_rl.data.tokenizer import model_ids


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt given as text, or as chat messages (the chat template with a generation prompt)."""
    if isinstance(prompt, str):
        return model_ids(tokenizer, prompt, tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if tokenizer.chat_template is None:
            raise ValueError("prompt is a list of chat messages but the tokenizer has no chat template")
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def encode_completion(tokenizer, completion) -> list[int]:
    """Token ids of a completion given as text or as a one-message assistant turn."""
    if isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict):
        completion = completion[0]["content"]
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be a string or one chat message, got {type(completion).__name__}")
    return model_ids(tokenizer, completion, tokenizer(completion, add_special_tokens=False)["input_ids"],
                     "completion")


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest sequence: ids [B, P] and padding mask [B, P] (1 = real token)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def drop_shared_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` (left-padded [B, L] tensors, one of them `attention_mask`) without the leading columns that are padding
    in every row: a micro-batch sliced from a larger batch then holds the same tensors as the same rows collated
    alone, so its numbers do not depend on which other rows shared the batch (or the rank)."""
    attended = batch["attention_mask"].any(0).nonzero()
    start = int(attended[0]) if len(attended) else 0
    return {name: tensor[:, start:] for name, tensor in batch.items()}


@dataclass
class DiffusionCollator:
    """Collate rows with `prompt` and `completion` into input_ids, attention_mask and response_mask."""

    tokenizer: object
    response_length: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts, responses = zip(*(self.encode(row) for row in rows))
        prompt_ids, prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id)  # [B, P]
        response_ids = torch.tensor(responses, dtype=torch.long)  # [B, R]
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [B, P+R]
        attention_mask = torch.cat([prompt_mask, torch.ones_like(response_ids)], dim=1)
        response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        response_mask[:, prompt_ids.shape[1] :] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids: the completion, then EOS up to `response_length`) of one row."""
        prompt = encode_prompt(self.tokenizer, row["prompt"])
        ids = encode_completion(self.tokenizer, row["completion"])
        if len(ids) + 1 > self.response_length:
            raise ValueError(
                f"completion of {len(ids)} tokens (+1 EOS) does not fit response_length={self.response_length}: "
                f"{row['completion'][:60]!r}… — raise response_length"
            )
        return prompt, ids + [self.tokenizer.eos_token_id] * (self.response_length - len(ids))

    def check(self, rows, where: str) -> None:
        """Encode every row once, so that a row a batch would refuse (a completion the tokenizer cannot write or that
        does not fit, a prompt it cannot read) fails before training, named by its index."""
        for i, row in enumerate(rows):
            try:
                self.encode(row)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where}: row {i}: {error}") from None


def require_columns(dataset, columns: list[str], where: str) -> None:
    """Raise a clear error when a dataset lacks a column the job needs."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where}: dataset is missing column(s) {missing}; it has {dataset.column_names}. "
            "Rename the columns or map the dataset before training."
        )
