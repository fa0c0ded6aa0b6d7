"""Character-level tokenizer of the tiny testbed, saved as a transformers fast tokenizer.

Every printable ASCII character and the newline is one token; `\\boxed{` is one token too, so that the answer
format costs the tiny models one position instead of seven.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, MASK = "<|pad|>", "<|eos|>", "<|mask|>"
BOXED = "\\boxed{"
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and "\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: ids 0-2 are pad, eos and mask, then `\\boxed{`, then one id per character."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, MASK, BOXED, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    # Each piece is `\boxed{` or any single character (newline included).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        mask_token=MASK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
