"""DiffusionCollator layout [pad…, prompt, response, eos…], prompt encoding (text and chat), dropping the padding a
micro-batch shares, and require_columns."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from dlm_rl.data.collate import (
    DiffusionCollator,
    drop_shared_padding,
    encode_completion,
    encode_prompt,
    left_pad,
    require_columns,
)
from dlm_rl.data.tokenizer import char_tokenizer

PAD, EOS, MASK, BOXED = 0, 1, 2, 3  # ids of the char tokenizer's special tokens and `\boxed{`
# the char tokenizer: "0"-"9" are 4-13, "a" 14, "+" 76, "<" 83, "=" 84, ">" 85, "}" 96, " " 98, "\n" 99
ONE, TWO, THREE, NINE, PLUS, EQ, CLOSE = 5, 6, 7, 13, 76, 84, 96
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"



@pytest.fixture
def tokenizer():
    return char_tokenizer()


def _ids(tokenizer, text):
    """Ids looked up piece by piece in the vocabulary (`\\boxed{` or one character), bypassing the tokenizer."""
    vocab, ids, i = tokenizer.get_vocab(), [], 0
    while i < len(text):
        piece = "\\boxed{" if text.startswith("\\boxed{", i) else text[i]
        ids.append(vocab[piece])
        i += len(piece)
    return ids


def test_layout_hand_computed(tokenizer):
    rows = [
        {"prompt": "1+2=", "completion": "\\boxed{3}"},
        {"prompt": "9=", "completion": "1"},
    ]
    batch = DiffusionCollator(tokenizer, response_length=5)(rows)
    assert batch["input_ids"].tolist() == [
        [ONE, PLUS, TWO, EQ, BOXED, THREE, CLOSE, EOS, EOS],
        [PAD, PAD, NINE, EQ, ONE, EOS, EOS, EOS, EOS],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 9, [0, 0] + [1] * 7]
    assert batch["response_mask"].tolist() == [[False] * 4 + [True] * 5] * 2
    assert batch["input_ids"].dtype == torch.long and batch["response_mask"].dtype == torch.bool


def test_layout_properties_on_varied_rows(tokenizer):
    prompts = ["", "a", "12+57+33=", "x y\nz", "1+1="]
    completions = ["1", "\\boxed{42}", "", "abcdefghi", "2"]
    R = 10
    batch = DiffusionCollator(tokenizer, response_length=R)([{"prompt": p, "completion": c}
                                                             for p, c in zip(prompts, completions)])
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    P = max(len(p) for p in prompts)  # one token per character here
    assert ids.shape == attn.shape == resp.shape == (5, P + R)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        pad = P - len(prompt)
        target = _ids(tokenizer, completion)
        assert ids[row, :pad].tolist() == [PAD] * pad  # left padding
        assert ids[row, pad:P].tolist() == _ids(tokenizer, prompt)  # prompt right before the response column
        assert ids[row, P : P + len(target)].tolist() == target  # every response starts in column P
        assert ids[row, P + len(target) :].tolist() == [EOS] * (R - len(target))  # EOS fill, at least one
        assert attn[row].tolist() == [0] * pad + [1] * (P + R - pad)  # zero exactly on the padding
    assert (resp[:, P:]).all() and not resp[:, :P].any()  # response canvas only, every row


def test_completion_filling_the_canvas_but_one_gets_exactly_one_eos(tokenizer):
    batch = DiffusionCollator(tokenizer, response_length=4)([{"prompt": "1=", "completion": "123"}])
    assert batch["input_ids"].tolist() == [[ONE, EQ, ONE, TWO, THREE, EOS]]
    with pytest.raises(ValueError, match="completion of 4 tokens \\(\\+1 EOS\\) does not fit response_length=4"):
        DiffusionCollator(tokenizer, response_length=4)([{"prompt": "1=", "completion": "1234"}])


def test_a_micro_batch_without_its_shared_padding_equals_its_rows_collated_alone(tokenizer):
    rows = [{"prompt": p, "completion": "\\boxed{3}"} for p in ("1+2=", "11+22+333=", "3=", "12=")]
    collate = DiffusionCollator(tokenizer, 6)
    together = collate(rows)
    for start, stop in ((0, 2), (2, 4), (3, 4)):
        part = drop_shared_padding({k: v[start:stop] for k, v in together.items()})
        alone = collate(rows[start:stop])
        assert {k: v.tolist() for k, v in part.items()} == {k: v.tolist() for k, v in alone.items()}
    assert drop_shared_padding(together)["input_ids"].shape == together["input_ids"].shape  # nothing shared


def test_left_pad_empty_sequence():
    ids, mask = left_pad([[], [7, 8]], pad_id=0)
    assert ids.tolist() == [[0, 0], [7, 8]] and mask.tolist() == [[0, 0], [1, 1]]


# --- prompt encoding --------------------------------------------------------------------------------------------


def test_encode_prompt_text_has_no_special_tokens(tokenizer):
    assert encode_prompt(tokenizer, "1+2=") == [ONE, PLUS, TWO, EQ]


def test_encode_prompt_chat_messages_use_template_with_generation_prompt(tokenizer):
    tokenizer.chat_template = TEMPLATE
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2"}]
    ids = encode_prompt(tokenizer, messages)
    assert ids == _ids(tokenizer, "<system>add\n<user>1+2\nA:")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)


def test_collator_with_chat_prompt_and_message_completion(tokenizer):
    tokenizer.chat_template = TEMPLATE
    rows = [
        {"prompt": [{"role": "user", "content": "1+2"}], "completion": [{"role": "assistant", "content": "3"}]},
        {"prompt": "9=", "completion": "9"},
    ]
    batch = DiffusionCollator(tokenizer, response_length=3)(rows)
    chat = _ids(tokenizer, "<user>1+2\nA:")
    P = len(chat)
    assert batch["input_ids"][0].tolist() == chat + [THREE, EOS, EOS]
    assert batch["input_ids"][1].tolist() == [PAD] * (P - 2) + [NINE, EQ, NINE, EOS, EOS]
    assert batch["attention_mask"][1].tolist() == [0] * (P - 2) + [1] * 5


def test_chat_messages_without_template_raise(tokenizer):
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="list of chat messages but the tokenizer has no chat template"):
        encode_prompt(tokenizer, [{"role": "user", "content": "1+2"}])
    with pytest.raises(ValueError, match="no chat template"):
        DiffusionCollator(tokenizer, 4)([{"prompt": [{"role": "user", "content": "1"}], "completion": "1"}])


@pytest.mark.parametrize("prompt", [42, ["1+2"], [{"content": "no role"}], None])
def test_encode_prompt_rejects_other_types(tokenizer, prompt):
    with pytest.raises(TypeError, match="a prompt must be a string or a list of chat messages"):
        encode_prompt(tokenizer, prompt)


def test_encode_completion_forms(tokenizer):
    assert encode_completion(tokenizer, "\\boxed{3}") == [BOXED, THREE, CLOSE]
    assert encode_completion(tokenizer, [{"role": "assistant", "content": "12"}]) == [ONE, TWO]
    with pytest.raises(TypeError, match="a completion must be a string or one chat message"):
        encode_completion(tokenizer, [{"content": "1"}, {"content": "2"}])


# --- require_columns --------------------------------------------------------------------------------------------


def test_require_columns():
    data = Dataset.from_dict({"prompt": ["1+2="], "answer": ["3"]})
    assert require_columns(data, ["prompt"], "here") is None
    with pytest.raises(ValueError, match=r"^job X: dataset is missing column\(s\) \['completion'\]; "
                                         r"it has \['prompt', 'answer'\]"):
        require_columns(data, ["prompt", "completion"], "job X")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['a', 'b'\]"):
        require_columns(data, ["a", "prompt", "b"], "job X")
