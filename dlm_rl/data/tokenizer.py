"""Character-level tokenizer of the tiny testbed, saved as a transformers fast tokenizer.

Every printable ASCII character and the newline is one token; `\\boxed{` is one token too, so that the answer
format costs the tiny models one position instead of seven. Any other character is `<|unk|>`, id 100: one past
the 100 ids the tiny models embed, so that adding it changed no id and no testbed checkpoint. A model reads an
`<|unk|>` of a prompt as `<|mask|>`, a position whose token it cannot see (`model_ids`); a completion, which a
model would have to learn to write, may not hold one.
"""

from __future__ import annotations

import logging
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, EOS, MASK, UNK = "<|pad|>", "<|eos|>", "<|mask|>", "<|unk|>"
BOXED = "\\boxed{"
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and "\n"
EMBEDDED = [PAD, EOS, MASK, BOXED, *CHARACTERS]  # ids 0-99: the tiny models' vocabulary
_warned = False  # the unrepresentable-characters warning is given once per run


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: ids 0-2 are pad, eos and mask, then `\\boxed{`, then one id per character, then
    `<|unk|>` (100)."""
    vocab = {token: i for i, token in enumerate([*EMBEDDED, UNK])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Each piece is `\boxed{` or any single character (newline included).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        mask_token=MASK,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def model_ids(tokenizer, text: str, ids: list[int], role: str = "prompt") -> list[int]:
    """`ids`, the encoding of `text`, as a model reads them. Characters the tokenizer cannot represent are warned
    about once per run; a prompt of nothing else is an error. The char tokenizer's `<|unk|>`, past the ids the tiny
    models embed, becomes `<|mask|>` in a prompt and is an error in a completion (`role`)."""
    global _warned
    unknown = _unknown_id(tokenizer)
    if unknown is None or unknown not in ids:
        return ids
    past_the_model = tokenizer.convert_ids_to_tokens(unknown) == UNK and unknown == len(EMBEDDED)
    characters = _unrepresented(tokenizer, text, unknown)  # none: the unknown token's own text, written out
    if characters and all(i == unknown for i in ids) and role == "prompt":
        raise ValueError(f"prompt {text[:60]!r} has no character the tokenizer can represent; give the model text "
                         "it can read (the tiny testbed models read printable ASCII)")
    if past_the_model and role == "completion":
        raise ValueError(f"completion {text[:60]!r} holds {''.join(characters) or UNK!r}, which the tokenizer "
                         "cannot represent; a model cannot learn to write it")
    if characters and not _warned:
        _warned = True
        token = tokenizer.convert_ids_to_tokens(unknown)
        read = f"read as {MASK}" if past_the_model else f"encoded as {token}"
        logger.warning("text holds characters the tokenizer cannot represent (%r in %s %r; %s); further such "
                       "text is not reported", "".join(characters), role, text[:60], read)
    if past_the_model:
        return [tokenizer.mask_token_id if i == unknown else i for i in ids]
    return ids


def _unknown_id(tokenizer) -> int | None:
    """The id of the token a tokenizer writes for what it cannot represent: its `unk_token`, else its backend's
    (the char tokenizer saved before `<|unk|>` existed wrote `<|pad|>`)."""
    if tokenizer.unk_token_id is not None:
        return tokenizer.unk_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    token = getattr(backend.model, "unk_token", None) if backend is not None else None
    return backend.token_to_id(token) if token else None


def _unrepresented(tokenizer, text: str, unknown: int) -> list[str]:
    """The distinct characters of `text` encoded as the unknown token, in order of appearance."""
    if not getattr(tokenizer, "is_fast", False):
        return ["?"]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token = tokenizer.convert_ids_to_tokens(unknown)
    pieces = [text[a:b] for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if i == unknown]
    return list(dict.fromkeys(p for p in pieces if p != token))
