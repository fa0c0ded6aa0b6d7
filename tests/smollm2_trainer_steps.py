"""Two steps of a trainer (tracerl, vrpo or didi) with LoRA on SmolLM2-135M-Instruct converted offline to a
diffusion LM, plus a chat-template sampling check; prints one JSON line.

    python tests/smollm2_trainer_steps.py MODEL_DIR {sample,tracerl,vrpo,didi} OUTPUT_DIR
    python tests/smollm2_trainer_steps.py MODEL_DIR served OUTPUT_DIR URL

`served` is diffu-GRPO with its rollouts from a server serving MODEL_DIR (`rollout_server` URL).

MODEL_DIR is SmolLM2 as converted and saved once by tests/test_smollm2.py. Run in its own process so that the
peak memory measured is this job's alone.
"""

import importlib
import json
import math
import os
import random
import resource
import sys
import time


def random_score(prompts, completions, **columns) -> list[float]:
    """A reward with spread whatever the completions are (an unadapted model's are often all empty): seeded random
    scores. These steps check the plumbing, not learning."""
    rng = random.Random(len(completions))
    return [rng.random() for _ in completions]


def _sample(model_dir: str) -> dict:
    """Chat-template prompts through the sampler at T = 1: the mask token never sampled, the text cut at the first
    EOS (a diffusion sampler may commit tokens right of it), and the token ids decode to text that re-encodes to the
    same text."""
    import torch

    from dlm_rl.evaluation import decode_responses, rollout
    from dlm_rl.models.loading import load
    from dlm_rl.sampling.config import SamplerConfig

    model = load(model_dir).eval()
    tokenizer = model.tokenizer
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2+3?", "Name a colour.", "Say hi.", "Count to 3.")]
    config = SamplerConfig(gen_length=32, block_length=16, threshold=0.9, temperature=1.0)
    (trajectory,) = rollout(model, prompts, config, batch_size=4, generator=torch.Generator().manual_seed(0))
    ids = trajectory.response_ids
    texts = decode_responses(tokenizer, ids)
    reencoded = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return {
        "prompt_has_chat_template": "<|im_start|>" in tokenizer.apply_chat_template(prompts[0], tokenize=False),
        "mask_token_sampled": bool((ids == model.mask_token_id).any()),
        "text_round_trips": reencoded == texts,
        "finish_reason_is_eos_iff_a_row_has_eos": [reason == "eos" for reason in trajectory.finish_reason]
        == [bool((row == tokenizer.eos_token_id).any()) for row in ids],
        "no_eos_text_in_completions": not any(tokenizer.eos_token in t for t in texts),
        "finish_reasons": list(trajectory.finish_reason),
        "nfe": trajectory.nfe.tolist(),
    }


def _train(model_dir: str, trainer: str, output_dir: str, url: str | None = None) -> dict:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from dlm_rl.recipe import TRAINERS

    rank = 8  # no SmolLM2 weight has a dimension of 8, so a tensor with one is a LoRA matrix
    common = dict(use_lora=True, lora_r=rank, max_steps=2, output_dir=output_dir, report_to="none", seed=0)
    online = dict(model=model_dir, dataset_name="chain", chat=True, gen_length=32, block_length=16, prompts_per_step=2,
                  num_generations=2, eval_size=2, eval_steps=2, **common)
    discriminator_lr = 1.234e-4  # tells the discriminator's optimiser (a teacher copy, trained in full) apart
    if trainer in ("tracerl", "served"):
        fields = dict(reward_funcs=[f"{os.path.abspath(__file__)}:random_score"], micro_batch_rows=8, **online)
        if trainer == "served":
            # lr 1e-2: two steps that move the adapter enough for the server's samples to change visibly
            fields.update(method="diffu_grpo", rollout_server=url, learning_rate=1e-2)
            trainer = "tracerl"
    elif trainer == "vrpo":
        pairs = os.path.join(output_dir, "pairs.jsonl")
        os.makedirs(output_dir, exist_ok=True)
        with open(pairs, "w") as f:
            for q, good, bad in [("What is 2+3?", "2+3 = 5.", "It is 7."), ("Name a colour.", "Blue.", "A dog."),
                                 ("What is 4+4?", "4+4 = 8.", "It is 9."), ("Name a fruit.", "A pear.", "A car.")]:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                    "chosen": [{"role": "assistant", "content": good}],
                                    "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
        fields = dict(n_t=2, micro_batch_pairs=2, **{**online, "dataset_name": None, "dataset_path": pairs})
    else:  # prompt-conditioned distillation on a chat-format file (short answers keep it fast)
        rows = os.path.join(output_dir, "rows.jsonl")
        os.makedirs(output_dir, exist_ok=True)
        with open(rows, "w") as f:
            for q, a in [("What is 2+3?", "2+3 = 5."), ("Name a colour.", "Blue."), ("Say hi.", "Hi there!")]:
                f.write(json.dumps({"prompt": [{"role": "user", "content": q}], "completion": a}) + "\n")
        fields = dict(teacher=model_dir, dataset_path=rows, gen_length=16, prompts_per_step=2, group_size=2,
                      discriminator_warmup_steps=0, discriminator_learning_rate=discriminator_lr, eval_steps=2,
                      eval_samples=2, eval_nfe=4, **common)
    updated_shapes = set()  # shapes of every tensor the policy's optimiser stepped with a gradient

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            if group["lr"] != discriminator_lr:
                updated_shapes.update(tuple(p.shape) for p in group["params"] if p.grad is not None)

    hook = register_optimizer_step_pre_hook(record)
    module_name, class_name = TRAINERS[trainer]
    module = importlib.import_module(module_name)
    start = time.perf_counter()
    module.run(getattr(module, class_name)(**fields))
    seconds = time.perf_counter() - start
    hook.remove()
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    losses = [line["loss"] for line in lines if "loss" in line]
    saved = os.listdir(os.path.join(output_dir, "final"))
    return {
        "losses": losses,
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "steps": [line["step"] for line in lines],
        "step_seconds": [sum(v for k, v in line.items() if k.startswith("time/")) for line in lines if line["step"]],
        "updated_tensors_all_lora": bool(updated_shapes) and all(rank in shape for shape in updated_shapes),
        "saved_adapter_only": "adapter_model.safetensors" in saved and "model.safetensors" not in saved,
        "seconds": seconds,
    }


if __name__ == "__main__":
    model_dir, job = sys.argv[1], sys.argv[2]
    result = _sample(model_dir) if job == "sample" else _train(model_dir, job, *sys.argv[3:])
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
