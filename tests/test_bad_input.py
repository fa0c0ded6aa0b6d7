"""Bad values are refused when the recipe or command line is parsed, before any model loads, naming the key, the
value and what is allowed; empty or malformed datasets name the file (and row); a reward file that does not import
names its line; the character tokenizer has a real `<|unk|>` and says once when text holds what it cannot write."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import dlm_rl.data.tokenizer as char
from dlm_rl.cli import main
from dlm_rl.data.collate import encode_completion, encode_prompt
from dlm_rl.models import load, tiny_model
from dlm_rl.recipe import parse_recipe

TRACERL = "trainer: tracerl\nmodel: tiny\ntask: addition3\n"
SMALL = dict(hidden_size=32, num_layers=1, intermediate_size=64)


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Every refusal here must come before a model is built or loaded."""
    import dlm_rl.model_spec

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(dlm_rl.model_spec, "resolve_model", refuse)


def recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


# --- recipe values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["tracerl", "vrpo"])
@pytest.mark.parametrize("key, value, allowed", [
    ("gen_length", "0", "gen_length must be a whole number of at least 1, got 0"),  # was: the task's length
    ("max_steps", "0", "max_steps must be a whole number of at least 1, got 0"),  # was: exit 0, nothing trained
    ("max_steps", "-3", "max_steps must be a whole number of at least 1, got -3"),
    ("eval_steps", "0", "eval_steps must be a whole number of at least 1, got 0"),  # was: ZeroDivisionError
    ("prompts_per_step", "0", "prompts_per_step must be a whole number of at least 1, got 0"),
    ("learning_rate", "0", "learning_rate must be positive, got 0"),  # was: a run that learns nothing
])
def test_online_recipe_values_out_of_range(tmp_path, trainer, key, value, allowed):
    path = recipe(tmp_path, f"trainer: {trainer}\nmodel: tiny\ntask: addition3\n{key}: {value}\n")
    with pytest.raises(ValueError, match=allowed):
        parse_recipe(path)
    with pytest.raises(ValueError, match=allowed):  # the same value on the command line
        parse_recipe(recipe(tmp_path, f"trainer: {trainer}\nmodel: tiny\ntask: addition3\n"), [f"--{key}", value])


RECIPES = {"tracerl": TRACERL, "vrpo": "trainer: vrpo\nmodel: tiny\ntask: addition3\n",
           "didi": "trainer: didi\nteacher: tiny\n"}


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("trainer, key, allowed", [
    ("tracerl", "temperature", "at least 0 and finite"),  # was: NaN passed every comparison
    ("tracerl", "weight_decay", "at least 0 and finite"),
    ("tracerl", "beta", "at least 0 and finite"),
    ("tracerl", "epsilon", "at least 0 and finite"),
    ("tracerl", "gamma", r"in \[0, 1\]"),
    ("tracerl", "max_grad_norm", "positive and finite"),
    ("vrpo", "beta", r"positive and finite \(β = 0 .*\)"),
    ("vrpo", "min_margin", "at least 0 and finite"),
    ("didi", "kl_coef", "at least 0 and finite"),
    ("didi", "likelihood_prior", "at least 0 and finite"),
    ("didi", "sequence_entropy_coef", "at least 0 and finite"),
    ("didi", "conditional_kl_coef", "at least 0 and finite"),
    ("didi", "label_smoothing", r"in \[0, 0.5\]"),
    ("didi", "max_grad_norm", "positive and finite"),
    ("didi", "discriminator_max_grad_norm", "positive and finite"),
    ("didi", "tau_beta_a", "at least 0 and finite"),
])
def test_a_setting_that_is_nan_or_inf_is_refused(tmp_path, trainer, key, allowed, value):
    message = f"{key} must be {allowed}, got {value}"
    with pytest.raises(ValueError, match=message):
        parse_recipe(recipe(tmp_path, f"{RECIPES[trainer]}{key}: .{value}\n"))
    with pytest.raises(ValueError, match=message):  # the same value on the command line
        parse_recipe(recipe(tmp_path, RECIPES[trainer]), [f"--{key}", value])


def test_a_yaml_value_of_the_wrong_type(tmp_path):
    with pytest.raises(ValueError, match=r"max_steps: 2.5 is not an integer"):  # was: TypeError after step 0
        parse_recipe(recipe(tmp_path, TRACERL + "max_steps: 2.5\n"))
    with pytest.raises(ValueError, match=r"use_lora: 'yes please' is not true or false"):
        parse_recipe(recipe(tmp_path, TRACERL + "use_lora: yes please\n"))
    _, config = parse_recipe(recipe(tmp_path, TRACERL + "learning_rate: 1e-4\nmax_grad_norm: 2\n"))
    assert config.learning_rate == 1e-4 and config.max_grad_norm == 2  # YAML's string "1e-4" and an int still pass


def test_reward_funcs_given_as_one_string(tmp_path):
    """A string was iterated character by character ("reward 'r' must look like ...")."""
    text = TRACERL + 'reward_funcs: "rewards.math:accuracy"\n'
    with pytest.raises(ValueError, match=r"reward_funcs: 'rewards.math:accuracy' is not a list of strings; write a "
                                         r"list: \[rewards.math:accuracy\]"):
        parse_recipe(recipe(tmp_path, text))
    from dlm_rl.trainers.tracerl import TraceRLConfig

    with pytest.raises(ValueError, match="reward_funcs must be a non-empty list"):
        TraceRLConfig(reward_funcs="rewards.math:accuracy")


def test_mdm_max_steps_and_learning_rate(tmp_path):
    mdm = "trainer: mdm\ntask: addition3\nuse_cpu: true\n"
    with pytest.raises(ValueError, match="max_steps must be a positive number of steps, or -1 .*; got 0"):
        parse_recipe(recipe(tmp_path, mdm + "max_steps: 0\n"))  # was: trained for num_train_epochs anyway
    with pytest.raises(ValueError, match="learning_rate must be positive, got 0"):
        parse_recipe(recipe(tmp_path, mdm + "learning_rate: 0\n"))
    assert parse_recipe(recipe(tmp_path, mdm + "max_steps: -1\n"))[1].max_steps == -1  # -1: train by epochs


def test_didi_values(tmp_path):
    from dlm_rl.trainers.didi import DiDiConfig

    for key, value in [("max_steps", 0), ("eval_steps", 0), ("gen_length", 0), ("eval_nfe", 0)]:
        with pytest.raises(ValueError, match=f"{key} must be a whole number of at least 1, got {value}"):
            DiDiConfig(**{key: value})
    with pytest.raises(ValueError, match=r"discriminator_head must be one of \('mlp', 'linear'\), got 'conv'"):
        DiDiConfig(discriminator_head="conv")
    with pytest.raises(ValueError, match="tau_beta_a and tau_beta_b must be positive, got 1.0, 0"):
        DiDiConfig(tau_beta_b=0)


def test_learning_rate_zero_stays_possible_from_python():
    """Code may freeze a policy on purpose (tests train only TraceRL's value model that way)."""
    from dlm_rl.trainers.tracerl import TraceRLConfig

    assert TraceRLConfig(learning_rate=0.0).learning_rate == 0.0
    with pytest.raises(ValueError, match="learning_rate must be at least 0 and finite, got -0.1"):
        TraceRLConfig(learning_rate=-0.1)


# --- datasets -----------------------------------------------------------------------------------------------------


def test_an_empty_dataset_file_is_named_when_the_recipe_is_parsed(tmp_path):
    """Was: a bare StopIteration from `datasets`, after the model loaded (VRPO) or before training (MDM)."""
    empty = tmp_path / "pairs.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"dataset {empty} is empty: it holds no rows"):
        parse_recipe(recipe(tmp_path, f"trainer: vrpo\nmodel: tiny\ntask: addition3\ndataset: {empty}\n"))
    with pytest.raises(ValueError, match=f"dataset_path {empty} is empty"):
        parse_recipe(recipe(tmp_path, f"trainer: mdm\ndataset_path: {empty}\nresponse_length: 8\nuse_cpu: true\n"))


def test_eval_on_an_empty_or_malformed_file(tmp_path, capsys):
    empty, mixed, number = tmp_path / "empty.jsonl", tmp_path / "mixed.jsonl", tmp_path / "number.jsonl"
    empty.write_text("")
    mixed.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": 7, "answer": "7"}\n')  # was: ArrowTypeError
    number.write_text('{"prompt": 7, "answer": "7"}\n')  # was: TypeError after the model loaded
    for path, message in [(empty, f"dataset file {empty} is empty"),
                          (mixed, f"dataset file {mixed}: row 1: prompt 7 \\(type int\\) is not text"),
                          (number, f"dataset file {number}: row 0: prompt 7 \\(type int\\) is not text")]:
        assert main(["eval", "--model", "tiny", "--dataset", str(path), "--gen-length", "8",
                     "--output-dir", str(tmp_path / "eval")]) == 2
        assert capsys.readouterr().err.count("error: ") == 1
        with pytest.raises(ValueError, match=message):
            from dlm_rl.data.benchmarks import load_benchmark

            load_benchmark(str(path))


def test_a_non_text_prompt_in_training_data_names_the_row(tmp_path):
    from dlm_rl.data.sources import completion_rows

    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    with pytest.raises(ValueError, match=f"dataset file {path}: row 1: prompt 3"):
        completion_rows(None, str(path), 10, 0, 8)


def test_a_completion_the_tokenizer_cannot_write_is_refused_before_the_model_loads(tmp_path):
    """Was: refused once the model had loaded (VRPO), or when a batch reached the row, mid-training (DiDi; MDM reads
    its rows through `completion_rows` too)."""
    from dlm_rl.data.sources import completion_rows
    from dlm_rl.trainers import didi, vrpo

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                     '{"prompt": "1+2=", "chosen": "caf\\u00e9", "rejected": "4"}\n')
    with pytest.raises(ValueError, match="completion 'café' holds 'é', which the tokenizer cannot represent"):
        vrpo.run(vrpo.VRPOConfig(model="tiny", dataset_path=str(pairs), gen_length=8, eval_size=1, prompts_per_step=1,
                                 output_dir=str(tmp_path / "vrpo")))
    rows = tmp_path / "sft.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "caf\\u00e9"}\n')
    named = re.escape(f"dataset file {rows}: row 1: completion 'café' holds 'é'")
    with pytest.raises(ValueError, match=named):
        didi.run(didi.DiDiConfig(teacher="tiny", dataset_path=str(rows), gen_length=8,
                                 output_dir=str(tmp_path / "didi")))
    with pytest.raises(ValueError, match=named):
        completion_rows(None, str(rows), 10, 0, 8, char.char_tokenizer())
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "a", "completion": "12345678"}\n')  # 8 tokens + EOS: one past the canvas
    with pytest.raises(ValueError, match=re.escape(f"dataset file {long}: row 0: completion of 8 tokens")):
        completion_rows(None, str(long), 10, 0, 8, char.char_tokenizer())


def test_the_tokenizer_is_known_without_the_model_for_tiny_and_saved_directories(tmp_path):
    from dlm_rl.model_spec import known_tokenizer

    assert known_tokenizer("tiny").unk_token_id == 100
    tiny_model(seed=0, **SMALL).save_pretrained(tmp_path)
    saved = known_tokenizer(str(tmp_path))
    assert saved("héllo", add_special_tokens=False)["input_ids"] == [21, 100, 25, 25, 28]
    assert known_tokenizer("GSAI-ML/LLaDA-8B-Instruct") is None  # read when the model loads


# --- reward files -------------------------------------------------------------------------------------------------


def test_a_reward_file_that_does_not_import_names_the_file_and_line(tmp_path, capsys):
    """Was: a raw SyntaxError traceback after `dlm-rl train` had started."""
    from dlm_rl.reward_functions import load_reward

    broken = tmp_path / "broken.py"
    broken.write_text("import math\n\ndef score(prompts, completions:\n    return [1.0]\n")
    with pytest.raises(ValueError, match=re.escape(str(broken)) + r".*SyntaxError.*line 3"):
        load_reward(f"{broken}:score")
    path = recipe(tmp_path, TRACERL + f"reward_funcs: ['{broken}:score']\ntrain_size: 4\nprompts_per_step: 2\n"
                  f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", path]) == 2
    assert re.search(re.escape(str(broken)) + r".*line 3", capsys.readouterr().err)


# --- command line -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["sample", "--prompt", "1+2=", "--gen-length", "0"], "argument --gen-length: must be a whole number of at least "
                                                          "1, got '0'"),  # was: 32 tokens generated
    (["sample", "--prompt", "1+2=", "--num-samples", "0"], "argument --num-samples: must be a whole number"),
    (["eval", "--dataset", "addition3", "--gen-length", "-8"], "argument --gen-length: must be a whole number"),
    (["eval", "--dataset", "addition3", "--batch-size", "0"], "argument --batch-size: must be a whole number"),
    (["eval", "--dataset", "addition3", "--pass-k", "1,0"], "argument --pass-k: expected positive integers"),
    (["eval", "--dataset", "addition3", "--block-length", "0"], "argument --block-length: must be a whole number"),
])
def test_command_line_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([argv[0], "--model", "tiny", *argv[1:]])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_eval_sampler_settings_are_checked_before_the_model_loads(capsys):
    assert main(["eval", "--model", "tiny", "--dataset", "addition3", "--block-length", "3"]) == 2
    assert "block_length=3 does not divide gen_length=8" in capsys.readouterr().err


def test_sampler_settings_that_are_not_finite_numbers(capsys):
    assert main(["sample", "--model", "tiny", "--prompt", "1+2=", "--temperature", "nan"]) == 2
    assert "temperature must be >= 0 and finite, got nan" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny", "--dataset", "addition3", "--cfg-scale", "inf"]) == 2
    assert "cfg_scale must be >= 0 and finite, got inf" in capsys.readouterr().err


# --- the character tokenizer's <|unk|> ----------------------------------------------------------------------------


def _tokenizer_before_unk() -> PreTrainedTokenizerFast:
    """The char tokenizer as the cached testbed checkpoints saved it: 100 tokens, unknown characters -> <|pad|>."""
    vocab = {token: i for i, token in enumerate(char.EMBEDDED)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=char.PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=char.PAD, eos_token=char.EOS,
                                   mask_token=char.MASK, padding_side="left", clean_up_tokenization_spaces=False)


def test_unknown_characters_are_a_real_unk_token_not_padding():
    tokenizer = char.char_tokenizer()
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<|unk|>", 100)
    ids = tokenizer("héllo 日本", add_special_tokens=False)["input_ids"]
    assert ids == [21, 100, 25, 25, 28, 98, 100, 100] and tokenizer.pad_token_id not in ids
    assert tokenizer.decode(ids[:5]) == "h<|unk|>llo"


def test_the_warning_comes_once_per_run_and_the_model_reads_a_mask(monkeypatch, caplog):
    monkeypatch.setattr(char, "_warned", False)
    tokenizer = char.char_tokenizer()
    with caplog.at_level(logging.WARNING, logger="dlm_rl.data.tokenizer"):
        assert encode_prompt(tokenizer, "héllo") == [21, tokenizer.mask_token_id, 25, 25, 28]
        assert encode_prompt(tokenizer, "naïve") == [*encode_prompt(tokenizer, "na"), tokenizer.mask_token_id,
                                                     *encode_prompt(tokenizer, "ve")]
        assert encode_prompt(tokenizer, "1+2=") == [5, 76, 6, 84]
    warnings = [r.getMessage() for r in caplog.records if "cannot represent" in r.getMessage()]
    assert len(warnings) == 1 and "'é' in prompt 'héllo'; read as <|mask|>" in warnings[0]


def test_a_prompt_of_nothing_representable_and_a_completion_with_unk_are_errors():
    """Was: three pad tokens passed the empty-prompt check and were generated from."""
    tokenizer = char.char_tokenizer()
    with pytest.raises(ValueError, match="prompt '日本語' has no character the tokenizer can represent"):
        encode_prompt(tokenizer, "日本語")
    with pytest.raises(ValueError, match="completion 'caf\u00e9' holds '\u00e9', which the tokenizer cannot represent"):
        encode_completion(tokenizer, "café")


def test_an_existing_testbed_checkpoint_is_unchanged_for_ascii(tmp_path, monkeypatch, caplog):
    """A checkpoint saved with the tokenizer of before `<|unk|>` loads and gives the same ids and logits for ASCII
    text as the new tokenizer; the tiny models still embed 100 ids; its own tokenizer still warns."""
    model = tiny_model(seed=0, **SMALL)
    assert model.config.vocab_size == 100 == model.model.get_input_embeddings().num_embeddings
    model.tokenizer = _tokenizer_before_unk()
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path).eval()
    text = "".join(char.CHARACTERS) + "\\boxed{12}"
    ids = char.char_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == ids and max(ids) < 100
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor([ids])).logits, model.eval()(torch.tensor([ids])).logits)
    monkeypatch.setattr(char, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="dlm_rl.data.tokenizer"):
        assert encode_prompt(loaded.tokenizer, "héllo") == [21, 0, 25, 25, 28]  # as before, now said
    assert "'é' in prompt 'héllo'; encoded as <|pad|>" in caplog.text


def test_transformers_own_arguments_keep_their_own_conversions(tmp_path):
    """MDM's TrainingArguments fields convert their values themselves: `fsdp: true` (annotated `str | None`) and
    `resume_from_checkpoint: true` are valid recipe values, not type errors."""
    from dlm_rl.recipe import parse_recipe

    path = tmp_path / "mdm.yaml"
    path.write_text("trainer: mdm\nmodel: tiny\ntask: addition3\nmax_steps: 1\nfsdp: true\n"
                    "resume_from_checkpoint: true\n")
    parse_recipe(str(path), [])


def test_a_learning_rate_that_is_not_a_number_is_refused(tmp_path):
    from dlm_rl.recipe import parse_recipe

    path = tmp_path / "r.yaml"
    path.write_text("trainer: tracerl\nmodel: tiny\ntask: addition3\nlearning_rate: .nan\n")
    with pytest.raises(ValueError, match="learning_rate must be at least 0 and finite, got nan"):
        parse_recipe(str(path), [])
