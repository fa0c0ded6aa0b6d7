"""Against real vLLM servers (the CPU build, in its own venv: scripts/serve_vllm.sh) serving SmolLM2-135M-Instruct:
the LLM-judge reward, judge perplexity from the server, a served reward model's scores, and ServedEngine's plumbing
with a trainer's LoRA adapter.

The CPU server runs SmolLM2 as the autoregressive model it is, so these tests prove the plumbing (requests, token
ids, scores, adapters, weight versions), not diffusion rollouts. Three servers start once for the module, in
parallel: a judge (no LoRA: see scripts/serve_vllm.sh), a rollout server with runtime LoRA loading, and SmolLM2
with a seeded one-output classification head as a reward model (--runner pooling).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.served

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "serve_vllm.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"judge": URL, "rollout": URL, "model_dir": the served SmolLM2 directory}."""
    env = {**os.environ, "DLM_RL_VLLM_RUN": str(tmp_path_factory.mktemp("vllm")), "PYTHON": sys.executable}
    subprocess.run([SCRIPT, "install"], env=env, check=True, capture_output=True, timeout=1800)
    converted = subprocess.run([SCRIPT, "model", "smollm2"], env=env, check=True, capture_output=True, text=True,
                               timeout=600)  # once, before the two servers start from it
    model_dir = converted.stdout.strip()
    reward_model_dir = str(tmp_path_factory.mktemp("reward_model"))
    _reward_model(model_dir, reward_model_dir)
    ports = {"judge": _free_port(), "rollout": _free_port(), "reward_model": _free_port()}
    served = {"judge": "smollm2", "rollout": "smollm2", "reward_model": reward_model_dir}
    extra = {"judge": [], "rollout": ["--", "--enable-lora", "--max-lora-rank", "16"],
             "reward_model": ["--", "--runner", "pooling"]}
    starts = {role: subprocess.Popen([SCRIPT, "start", served[role], str(port), *extra[role]], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for role, port in ports.items()}
    urls = {}
    try:
        for role, process in starts.items():
            out, err = process.communicate(timeout=900)
            assert process.returncode == 0, f"the {role} server did not start:\n{err[-3000:]}"
            urls[role] = out.strip().splitlines()[-1]
        yield {**urls, "model_dir": model_dir, "reward_model_dir": reward_model_dir}
    finally:
        for port in ports.values():
            subprocess.run([SCRIPT, "stop", str(port)], env=env, capture_output=True, timeout=120)


def _reward_model(model_dir: str, path: str) -> None:
    """SmolLM2 with a seeded one-output sequence-classification head: a reward model's on-disk format."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)


def test_a_served_reward_model_gives_its_heads_raw_score_for_text_and_conversations(servers):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewards.reward_model import ServedRewardModel

    local = AutoModelForSequenceClassification.from_pretrained(servers["reward_model_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(servers["reward_model_dir"])
    conversation = [{"role": "user", "content": "What is 2+3?"}]
    with torch.no_grad():
        expected = [local(**tokenizer("What is 2+3? 5", return_tensors="pt")).logits.item(),
                    local(**tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": "7"}],
                                                          return_tensors="pt", return_dict=True)).logits.item()]
    reward = ServedRewardModel(servers["reward_model"])
    scores = reward(["What is 2+3? ", conversation], ["5", [{"role": "assistant", "content": "7"}]])
    assert scores == pytest.approx(expected, abs=1e-4)
    assert scores != pytest.approx(torch.sigmoid(torch.tensor(expected)).tolist(), abs=1e-4)  # raw, not squashed


def test_the_judge_reward_scores_a_batch_and_counts_cache_hits(servers):
    from rewards.judge import LLMJudge

    judge = LLMJudge(servers["judge"])
    assert judge.model == "base"
    prompts = ["What is 2+3?", "Name the capital of France.", "What is 2+3?", "Say hello."]
    completions = ["5", "Paris", "5", "Hello!"]
    scores = judge(prompts, completions)
    assert len(scores) == 4 and scores[0] == scores[2]
    assert all(s is None or 0 <= s <= 1 for s in scores)
    assert any(s is not None for s in scores)  # the 135M judge answers some with a number
    assert (judge.requests, judge.cache_hits) == (3, 1)
    assert judge(prompts[:2], completions[:2]) == scores[:2]
    assert (judge.requests, judge.cache_hits) == (3, 3)


def test_the_judge_reward_named_in_a_recipe_runs_in_a_reward_worker(servers, monkeypatch):
    from dlm_rl.reward_functions import Rewards

    monkeypatch.setenv("DLM_RL_JUDGE_URL", servers["judge"])
    rewards = Rewards(["rewards.judge:judge"], timeout=120)
    try:
        result = rewards(["What is 2+3?", "Say hello."], ["5", "Hello!"])
    finally:
        rewards.close()
    assert result["errors"] == [None, None]
    assert all(s is None or 0 <= s <= 1 for s in result["judge"])


def test_a_call_that_outlives_the_timeout_fails_within_the_bounded_retries(servers):
    from dlm_rl.serving import ServerError
    from rewards.judge import LLMJudge

    judge = LLMJudge(servers["judge"], timeout=0.001, retries=1)  # no real reply comes back in 1 ms
    judge.endpoint.backoff = 0.01
    with pytest.raises(ServerError, match=r"failed 2 times \(last: no reply within 0.001 s\)"):
        judge(["What is 2+3?"], ["5"])


def test_served_judge_perplexity_equals_the_local_judges(servers):
    from transformers import AutoTokenizer

    from dlm_rl.judge import judge_perplexity, load_judge, served_judge_perplexity
    from dlm_rl.serving import Endpoint

    judge, tokenizer = load_judge(servers["model_dir"]), AutoTokenizer.from_pretrained(servers["model_dir"])
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(t)["input_ids"] for t in ("The capital of France is", "2+2=", "Write a poem about the sea.")]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])  # left padded
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    answers = [" Paris, the city of light.", " 4", " The sea is wide and deep,"]
    responses = torch.full((3, 12), eos)
    for b, answer in enumerate(answers):
        ids = tokenizer(answer)["input_ids"][:11] + ([eos] if b == 1 else [])  # one response ends early
        responses[b, : len(ids)] = torch.tensor(ids)
    local = judge_perplexity(judge, prompt_ids, prompt_mask, responses, eos)
    served = served_judge_perplexity(Endpoint(servers["judge"]), "base", prompt_ids, prompt_mask, responses, eos)
    assert served == pytest.approx(local, rel=1e-3)
    assert served != pytest.approx(served_judge_perplexity(Endpoint(servers["judge"]), "base", prompt_ids,
                                                           prompt_mask, responses.roll(1, 0), eos), rel=1e-3)


def test_served_engine_returns_completions_with_token_ids_then_takes_a_trainers_adapter(servers, tmp_path):
    from dlm_rl.models.loading import load
    from dlm_rl.rollout.served import ServedEngine
    from dlm_rl.sampling.config import SamplerConfig

    base = load(servers["model_dir"])
    tokenizer = base.tokenizer
    config = SamplerConfig(gen_length=16, temperature=1.0)
    prompts = [[{"role": "user", "content": "What is 2+3?"}], [{"role": "user", "content": "Name a colour."}]]
    with ServedEngine(servers["rollout"], tokenizer, rows_per_chunk=4) as engine:
        first = engine.generate(prompts, 2, config, seed=7)
        engine.load_state_dict({"calls": 0, "version": 0})  # the same call again: the same chunk seeds
        again = engine.generate(prompts, 2, config, seed=7)
        for t in first:
            assert t.step_map is None and t.log_probs is None and t.weight_version == 0
            assert t.response_ids.shape[1] == 16
            for b, text in enumerate(t.completions):
                returned = t.response_ids[b][t.sampled[b]].tolist()
                assert tokenizer.decode(returned, skip_special_tokens=True) == text
                assert (t.finish_reason[b] == "eos") == (returned[-1] == tokenizer.eos_token_id)
        assert [(t.prompt_index, t.sample_index) for t in first] == [([0, 0, 1, 1], [0, 1, 0, 1])]
        texts = [c for t in first for c in t.completions]
        assert texts == [c for t in again for c in t.completions]  # the same seeds ask for the same samples
        assert texts[0] != texts[1] or texts[2] != texts[3]  # samples of one prompt have seeds of their own

        # two diffu-GRPO steps of the trainer with its rollouts from this server
        run = tmp_path / "run"
        done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "smollm2_trainer_steps.py"),
                               servers["model_dir"], "served", str(run), servers["rollout"]],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["losses_finite"]
        lines = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
        assert [(x["step"], x["weight_version"]) for x in lines] == [(1, 1)] * 4 + [(2, 2)] * 4

        # the adapter it saved, loaded into this engine's server: a new weight version, and other samples for the
        # same seeds
        assert engine.sync_weights(load(str(run / "final"))) == 1
        engine.load_state_dict({"calls": 0, "version": 1})
        after = engine.generate(prompts, 2, config, seed=7)
        assert all(t.weight_version == 1 for t in after)
        assert [c for t in after for c in t.completions] != texts
