"""Data parallelism: two gloo processes (torchrun) give the gradients of one process on the same global batch, for
each trainer's loss: TraceRL's PPO trace loss (and its value loss), VRPO's loss, DiDi's student and discriminator
losses, and the MDM SFT loss (transformers' Trainer with DDP), whose ranks must also draw different masks from
one shared data order. The rank shares are deliberately uneven (rows, pairs and tokens), and one TraceRL rank gets
no rows at all (the group filter drops its only group).

The test also shows it can fail: without the gradient sum, or with the mean of per-rank means (DDP's average of
losses normalised per rank), the gradients are off by far more than the tolerance.

The test runs this file as a script under torchrun (`__main__` below); rank 0 writes the differences to JSON.
The other tests check what the GPU launches need: the accelerate configs, the GPU recipes' launch commands and
memory estimates, and the refusal of sharded launches by the RL trainers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dlm_rl.guards import NonFiniteLoss

TOLERANCE = 1e-6
WORLD = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_RECIPES = ["tracerl_llada8b_math", "tracerl_dream7b_math", "tracerl_sdar8b_math", "vrpo_llada8b", "didi_mdlm_owt"]
PAIRS = [("1+2=", "3", "4"), ("33+4=", "37", "7"), ("5+16=", "21", "2"), ("8+8=", "16", "61"), ("12+30=", "42", "4")]


BASE = {"model": "tiny"}  # the model every case starts from: "smollm2" in the slow SmolLM2 run


def base():
    """A fresh copy of the cases' model: the tiny model, or SmolLM2-135M-Instruct with its mask token (drawn from the
    same seed in every process)."""
    if BASE["model"] == "smollm2":
        from dlm_rl.model_spec import resolve_model

        torch.manual_seed(0)
        return resolve_model("smollm2")
    from dlm_rl.models.tiny import tiny_model

    return tiny_model(hidden_size=32, num_layers=2, intermediate_size=64, seed=0)


def lora_model():
    from dlm_rl.models.lora import LoraArguments, add_lora

    return add_lora(base(), LoraArguments(use_lora=True, lora_r=4))


def value_model():
    from dlm_rl.models.lora import LoraArguments
    from dlm_rl.rl.value import ValueModel

    return ValueModel.from_policy(base(), LoraArguments(use_lora=True, lora_r=4))


def perturb(module, scale: float, names: tuple[str, ...] = ("",)) -> None:
    """Move weights off their initial values (LoRA B and value heads start at zero: no gradient would flow)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and any(n in name for n in names):
                p.add_(scale * torch.randn_like(p))


def loaded(build, state):
    module = build()
    module.load_state_dict(state)
    return module


def row_noise(response_mask, *, n_t=1, n_yt=1, form="tokens", schedule="linear", t_min=1e-3, generator=None,
              blocks=None):
    """MCNoise drawn row by row from one fixed seed over the row's response positions, so that a row's masks do not
    depend on the batch it is in (the estimators draw one tensor for the whole batch). Full-attention models only
    (`blocks` None)."""
    from dlm_rl.diffusion.noise import MCNoise

    assert blocks is None, "row_noise draws row-level noise: the tests' models are full-attention ones"

    n = n_t * n_yt
    batch, width = response_mask.shape
    masked = torch.zeros(n, batch, width, dtype=torch.bool)
    weights, times = [], []
    for b in range(batch):
        columns = response_mask[b].nonzero()[:, 0]
        draw = MCNoise.sample(torch.ones(1, len(columns), dtype=torch.bool), n_t=n_t, n_yt=n_yt, form=form,
                              schedule=schedule, t_min=t_min, generator=torch.Generator().manual_seed(7))
        masked[:, b, columns] = draw.masked[:, 0]
        weights.append(draw.weight)
        times.append(draw.t)
    return MCNoise(masked, torch.cat(weights, 1), torch.cat(times, 1), form, schedule)


def build_inputs() -> dict:
    """Every case's global batch and starting weights (one process builds them; the ranks load them)."""
    from dlm_rl.data.collate import DiffusionCollator
    from dlm_rl.rl.didi import Discriminator, discriminator_reward, noise_at, rollout
    from dlm_rl.rollout import LocalEngine
    from dlm_rl.sampling import SamplerConfig
    from dlm_rl.testbed import TASKS

    torch.manual_seed(0)
    policy = lora_model()
    perturb(policy, 0.2, ("lora_B",))
    value = value_model()
    perturb(value, 0.05, ("lora_B", "head"))
    engine = LocalEngine(policy, rows_per_chunk=64, seed=3)
    sampler = SamplerConfig(gen_length=4, temperature=1.0)
    (two,) = engine.generate(["1+2=", "33+4="], 4, sampler)  # rank 0's share
    (one,) = engine.generate(["5+16="], 4, sampler)  # rank 1's
    (tied,) = engine.generate(["7+8="], 4, sampler)  # a group without reward variance: no rows
    for trajectory, rewards in ((two, [0, 1, 2, 0, 1, 1, 3, 0]), (one, [0, 2, 2, 1]), (tied, [1, 1, 1, 1])):
        trajectory.rewards = {"total": [float(r) for r in rewards], "errors": [None] * len(rewards)}

    teacher = base().requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True)
    perturb(student, 0.02)
    discriminator = Discriminator(teacher, trainable_blocks=1)
    perturb(discriminator, 0.5, ("head", "time_embedding"))  # the time embedding starts at zero
    rows = list(TASKS["addition3"].dataset("train", 3, seed=0))
    width = TASKS["addition3"].response_length if BASE["model"] == "tiny" else 12  # SmolLM2: 8 tokens + EOS
    batch = DiffusionCollator(teacher.tokenizer, width)(rows)
    group = 2
    ids, attention, response = (batch[k].repeat_interleave(group, 0) for k in
                                ("input_ids", "attention_mask", "response_mask"))
    tau = torch.tensor([0.3, 0.6, 0.8]).repeat_interleave(group)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sample = rollout(student, ids, attention, response, tau, generator=generator)
        fake, fake_masked = noise_at(sample.final, response, tau, teacher.mask_token_id, generator)
        real, real_masked = noise_at(ids, response, tau, teacher.mask_token_id, generator)
        reward = discriminator_reward(discriminator(fake, attention, time=tau), fake_masked)
    didi = {"attention": attention, "response": response, "tau": tau, "reward": reward, "fake": fake,
            "fake_masked": fake_masked, "real": real, "real_masked": real_masked,
            "start": sample.states[0], "middle": sample.states[1], "final": sample.final,
            "first": sample.revealed[0], "second": sample.revealed[1]}

    mdm_rows = list(TASKS["addition3"].dataset("train", 4, seed=5))
    return {"policy": policy.state_dict(), "value": value.state_dict(), "trajectories": [two, one, tied],
            "pairs": [{"prompt": p, "chosen": f"\\boxed{{{c}}}", "rejected": f"\\boxed{{{r}}}"} for p, c, r in PAIRS],
            "teacher": teacher.state_dict(), "student": student.state_dict(),
            "discriminator": discriminator.state_dict(), "didi": didi, "mdm_rows": mdm_rows}


def _grads(named) -> dict:
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for name, p in named if p.requires_grad}


def tracerl(inputs, trajectories, with_value=False, fsdp=False, use_lora=True) -> dict:
    """TraceRL's step; with `fsdp`, the policy and value model sharded (FSDP2) over the ranks: the summed gradients,
    gathered whole from their shards. Without `use_lora`, every weight of the policy trains (KL to π_old)."""
    from dlm_rl import distributed
    from dlm_rl.trainers.tracerl import Learner, TraceRLConfig

    policy = loaded(lora_model, inputs["policy"]) if use_lora else loaded(base, inputs["student"])
    value = loaded(value_model, inputs["value"]) if with_value else None
    config = TraceRLConfig(model="tiny", beta=0.1, kl_reference="reference" if use_lora else "old",
                           micro_batch_rows=5, max_grad_norm=1e9, value_model=with_value, use_lora=use_lora,
                           ppo_minibatches=1, fsdp=fsdp)  # one step: its gradients are compared
    learner = Learner(policy, config, gen_length=4, value=value)
    learner.optimizer = torch.optim.SGD(learner.parameters, lr=0.0)  # the gradients stay, the weights do not move
    if value is not None:
        learner.value_optimizer = torch.optim.SGD(learner.value_parameters, lr=0.0)
    sharded = [p for p in learner.parameters + getattr(learner, "value_parameters", [])
               if type(p).__name__ == "DTensor"]
    assert len(sharded) == (len(learner.parameters) + len(getattr(learner, "value_parameters", []))
                            if fsdp and distributed.world_size() > 1 else 0), "sharded as asked"
    learner.update(trajectories)
    grads = _grads(policy.named_parameters())
    if value is not None:
        grads.update(_grads((f"value.{n}", p) for n, p in value.named_parameters()))
    return {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}


def vrpo(inputs, pairs) -> dict:
    from dlm_rl.rl.vrpo import PreferenceEstimator, collate_pairs
    from dlm_rl.trainers.vrpo import VRPOConfig, _update

    class RowNoise(PreferenceEstimator):
        def sample(self, response_mask, generator, blocks=None):  # a full-attention model: blocks is None
            return row_noise(response_mask, n_t=self.n_t, n_yt=self.n_yt, form=self.form)

    model = loaded(lora_model, inputs["policy"])
    config = VRPOConfig(model="tiny", micro_batch_pairs=2, max_grad_norm=1e9, n_t=4)
    chosen, rejected = collate_pairs(model.tokenizer, pairs, 8)
    parameters = [p for p in model.parameters() if p.requires_grad]
    _update(model, torch.optim.SGD(parameters, lr=0.0), parameters, chosen, rejected, RowNoise(n_t=4), config,
            None, None, NonFiniteLoss(1, "VRPO"))
    return _grads(model.named_parameters())


def vrpo_fsdp(model, pairs, use_lora: bool) -> dict:
    """VRPO's step with `model` sharded (FSDP2) over the ranks, whole weights gathered for the step: the summed
    gradients, gathered whole from their shards."""
    from dlm_rl import distributed, sharding
    from dlm_rl.rl.vrpo import PreferenceEstimator, collate_pairs
    from dlm_rl.trainers.vrpo import VRPOConfig, _update

    class RowNoise(PreferenceEstimator):
        def sample(self, response_mask, generator, blocks=None):
            return row_noise(response_mask, n_t=self.n_t, n_yt=self.n_yt, form=self.form)

    frozen = None if use_lora else copy.deepcopy(model).requires_grad_(False)
    if distributed.world_size() > 1:
        sharding.shard(model)
    config = VRPOConfig(model="tiny", micro_batch_pairs=2, max_grad_norm=1e9, n_t=4, use_lora=use_lora)
    chosen, rejected = collate_pairs(model.tokenizer, pairs, 8)
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert distributed.world_size() == 1 or all(type(p).__name__ == "DTensor" for p in parameters), "not sharded"
    sharding.gather(model)
    _update(model, torch.optim.SGD(parameters, lr=0.0), parameters, chosen, rejected, RowNoise(n_t=4), config,
            None, frozen, NonFiniteLoss(1, "VRPO"))
    grads = _grads(model.named_parameters())
    return {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}


def _didi(inputs):
    from dlm_rl.rl.didi import Discriminator
    from dlm_rl.trainers.didi import DiDiConfig

    teacher = loaded(base, inputs["teacher"]).requires_grad_(False).eval()
    student = loaded(base, inputs["student"])
    discriminator = Discriminator(teacher, trainable_blocks=1)
    discriminator.load_state_dict(inputs["discriminator"])
    config = DiDiConfig(teacher="tiny", dataset_name="addition3", group_size=2, kl_coef=0.5, entropy_coef=0.1,
                        conditional_kl_coef=0.3, conditional_folds=1, max_grad_norm=1e9,  # one fold: the same folds
                        discriminator_max_grad_norm=1e9)
    return teacher, student, discriminator, config


def sharded(module, fsdp: bool) -> list:
    """With `fsdp` (and several ranks), `module` sharded (FSDP2) and its whole weights gathered for a step; its
    trainable (sharded) weights."""
    from dlm_rl import distributed, sharding

    if fsdp and distributed.world_size() > 1:
        sharding.shard(module)
    parameters = [p for p in module.parameters() if p.requires_grad]
    assert all(type(p).__name__ == "DTensor" for p in parameters) == (fsdp and distributed.world_size() > 1)
    sharding.gather(module)
    return parameters


def whole(grads: dict) -> dict:
    return {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}


def didi_student(inputs, rows, fsdp=False, use_lora=False) -> dict:
    from dlm_rl.models.lora import LoraArguments, add_lora
    from dlm_rl.rl.didi import Rollout
    from dlm_rl.trainers.didi import _student_update

    teacher, student, _, config = _didi(inputs)
    if use_lora:  # the same adapter on every rank and in the one-process step
        torch.manual_seed(5)
        add_lora(student, LoraArguments(use_lora=True, lora_r=4))
        perturb(student, 0.02, ("lora_B",))
    parameters = sharded(student, fsdp)
    d = {k: v[rows] for k, v in inputs["didi"].items()}
    logits = [student(d["start"], d["attention"]).logits, student(d["middle"], d["attention"]).logits]
    sample = Rollout([d["start"], d["middle"]], [d["first"], d["second"]], logits, d["final"], d["tau"])
    _student_update(student, teacher, torch.optim.SGD(parameters, lr=0.0), parameters, sample, d["reward"],
                    d["response"], d["attention"], config, NonFiniteLoss(1, "DiDi"), None)
    return whole(_grads(student.named_parameters()))


def didi_discriminator(inputs, rows, fsdp=False) -> dict:
    from dlm_rl.trainers.didi import _discriminator_update

    _, _, discriminator, config = _didi(inputs)
    optimizer = torch.optim.SGD(sharded(discriminator, fsdp), lr=0.0)
    d = {k: v[rows] for k, v in inputs["didi"].items()}
    _discriminator_update(discriminator, optimizer, d["real"], d["real_masked"], d["fake"], d["fake_masked"],
                          d["tau"], d["attention"], None, config, None, NonFiniteLoss(1, "DiDi"))  # no likelihood prior
    return whole(_grads(discriminator.named_parameters()))


def mdm(inputs, shard, directory, sync=True) -> tuple[dict, dict]:
    """The MDM trainer's loss on the transformers Trainer: (the gradients of one process on every row, this rank's
    gradients after DDP's all-reduce on its share; accelerate wraps the model under torchrun)."""
    import contextlib

    from datasets import Dataset

    from dlm_rl.diffusion.noise import MCNoise
    from dlm_rl.testbed import TASKS
    from dlm_rl.trainers import mdm as module

    class RowNoise(MCNoise):
        sample = staticmethod(row_noise)

    model, rows = base(), inputs["mdm_rows"]
    args = module.MDMConfig(output_dir=directory, dataset_name="addition3", use_cpu=True, report_to="none")
    trainer = module.MDMTrainer(model, args, Dataset.from_list(rows), TASKS["addition3"].response_length)
    wrapped = trainer.accelerator.prepare_model(model)

    def grads(forward, batch_rows, context) -> dict:
        model.zero_grad(set_to_none=True)
        with context:
            trainer.accelerator.backward(trainer.compute_loss(forward, trainer.data_collator(batch_rows)))
        return _grads(model.named_parameters())

    original, module.MCNoise = module.MCNoise, RowNoise
    try:
        single = grads(model, rows, contextlib.nullcontext())  # not through DDP's forward: no all-reduce
        parallel = grads(wrapped, shard(rows), contextlib.nullcontext() if sync else wrapped.no_sync())
    finally:
        module.MCNoise = original
    return single, parallel


def mdm_first_masks(inputs, directory) -> torch.Tensor:
    """The masks an MDM rank draws first after its Trainer is built (the Trainer seeds every rank alike)."""
    from datasets import Dataset

    from dlm_rl.diffusion.noise import MCNoise
    from dlm_rl.testbed import TASKS
    from dlm_rl.trainers import mdm as module

    args = module.MDMConfig(output_dir=directory, dataset_name="addition3", use_cpu=True, report_to="none")
    module.MDMTrainer(base(), args, Dataset.from_list(inputs["mdm_rows"]), TASKS["addition3"].response_length)
    return MCNoise.sample(torch.ones(4, 32, dtype=torch.bool)).masked


def mdm_epoch_rows(directory) -> list[tuple]:
    """The rows (as token ids) one MDM rank trains on in an epoch of 16 distinct rows: the ranks' rows must be
    disjoint and cover the data, whatever seeds the ranks' masks."""
    from datasets import Dataset

    from dlm_rl.testbed import TASKS
    from dlm_rl.trainers import mdm as module

    rows = list(TASKS["addition3"].dataset("train", 16, seed=5))
    assert len({row["prompt"] for row in rows}) == 16
    args = module.MDMConfig(output_dir=directory, dataset_name="addition3", use_cpu=True, report_to="none",
                            per_device_train_batch_size=2)
    trainer = module.MDMTrainer(base(), args, Dataset.from_list(rows), TASKS["addition3"].response_length)
    return [tuple(ids.tolist()) for batch in trainer.get_train_dataloader() for ids in batch["input_ids"]]


def didi_rows(prompts) -> list[int]:
    return [prompt * 2 + g for prompt in prompts for g in range(2)]


def rl_cases(inputs, part, world: int) -> dict:
    """The RL trainers' cases: each computes its gradients on `part` of its global batch."""
    two, one, tied = inputs["trajectories"]
    trajectories, emptied = part([two, one]), part([two, tied])
    if world == 1:  # the single-process step sees both shares in one batch
        trajectories, emptied = [two, one], [two, tied]
    return {
        "tracerl": lambda: tracerl(inputs, trajectories),
        "tracerl_value_model": lambda: tracerl(inputs, trajectories, with_value=True),
        "tracerl_rank_without_rows": lambda: tracerl(inputs, emptied),
        "tracerl_fsdp_value_model": lambda: tracerl(inputs, trajectories, with_value=True, fsdp=True),
        "tracerl_fsdp_rank_without_rows": lambda: tracerl(inputs, emptied, fsdp=True),
        "tracerl_fsdp_full": lambda: tracerl(inputs, trajectories, fsdp=True, use_lora=False),
        "vrpo": lambda: vrpo(inputs, part(inputs["pairs"])),
        "vrpo_fsdp_lora": lambda: vrpo_fsdp(loaded(lora_model, inputs["policy"]), part(inputs["pairs"]), True),
        "vrpo_fsdp_full": lambda: vrpo_fsdp(loaded(base, inputs["teacher"]), part(inputs["pairs"]), False),
        "didi_student": lambda: didi_student(inputs, didi_rows(part([0, 1, 2]))),
        "didi_discriminator": lambda: didi_discriminator(inputs, didi_rows(part([0, 1, 2]))),
        "didi_fsdp_student": lambda: didi_student(inputs, didi_rows(part([0, 1, 2])), fsdp=True),
        "didi_fsdp_student_lora": lambda: didi_student(inputs, didi_rows(part([0, 1, 2])), fsdp=True, use_lora=True),
        "didi_fsdp_discriminator": lambda: didi_discriminator(inputs, didi_rows(part([0, 1, 2])), fsdp=True),
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_equal_gradients(exact: dict) -> None:
    """Each case's (largest difference, largest gradient): float32 sums in another order stay within 1e-6 of the
    largest gradient when it exceeds 1 (DiDi's student: 2-3; SmolLM2: up to 18)."""
    for name, (diff, size) in exact.items():
        assert size > 1e-3, f"{name}: no gradient to compare"
        assert diff <= TOLERANCE * max(1.0, size), f"{name}: the gradients differ by {diff} (largest {size})"


def test_two_processes_give_the_single_process_gradients_of_every_trainers_loss(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               os.path.abspath(__file__), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["exact"]) == {"tracerl", "tracerl_value_model", "tracerl_rank_without_rows",
                                     "tracerl_fsdp_value_model", "tracerl_fsdp_rank_without_rows", "tracerl_fsdp_full",
                                     "vrpo", "vrpo_fsdp_lora", "vrpo_fsdp_full", "didi_student", "didi_discriminator",
                                     "didi_fsdp_student", "didi_fsdp_student_lora", "didi_fsdp_discriminator", "mdm"}
    assert_equal_gradients(results["exact"])
    assert not results["mdm_ranks_draw_the_same_masks"]
    assert results["mdm_epoch_rows"] == [8, 8, 16]  # each rank 8 rows, 16 distinct together
    assert results["scattered"] == [f"part {r}" for r in range(WORLD)]
    # rank 0's failure reaches the other ranks at once, with its cause, instead of leaving them waiting
    assert results["main_fails_while_scattering"] == ["ValueError: no rollouts"] + [
        "MainProcessFailed: rank 0 failed (ValueError: no rollouts); see its log"] * (WORLD - 1)
    for mutation, diffs in results["broken"].items():  # the comparison catches these mistakes
        assert len(diffs) >= 4
        for name, diff in diffs.items():
            assert diff > 100 * TOLERANCE, f"{name} with {mutation}: only {diff}"


@pytest.mark.slow
def test_two_processes_give_the_single_process_gradients_on_smollm2(tmp_path):
    """The sharded (FSDP2) RL cases above on SmolLM2-135M-Instruct (offline): VRPO and TraceRL (LoRA with the value
    model, and full), DiDi's student (full and LoRA) and discriminator. In a 30-layer model a micro-batch's numbers
    would show any dependence on the rows or padding of the rest of its rank's batch (`make test-slow`)."""
    launch(tmp_path, [*TORCHRUN, os.path.abspath(__file__), str(tmp_path), "smollm2"], timeout=3600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["exact"]) == 8
    assert_equal_gradients(results["exact"])


def test_under_torchrun_rank_0s_ray_actors_sample_every_ranks_share(tmp_path):
    """TraceRL with two rollout actors, run in one process and as two torchrun processes: rank 0 samples every
    share on the actors (chunks align with the shares, so the samples are the one process's) and sends each rank
    its own; the logged rewards, held-out accuracy and losses must agree."""
    pytest.importorskip("ray")
    (tmp_path / "reward.py").write_text("def by_characters(prompts, completions, **columns):\n"
                                        "    return [float(sum(map(ord, c)) % 7) for c in completions]\n")
    (tmp_path / "recipe.yaml").write_text(
        "trainer: tracerl\nmodel: tiny\ntask: addition3\ntrain_size: 8\neval_size: 2\nnum_generations: 4\n"
        "prompts_per_step: 4\nlora_r: 4\nmax_steps: 2\neval_steps: 2\nreport_to: none\n"
        "ppo_minibatches: 1\n"  # one step per rollout: minibatches split each rank's share, not the whole rollout
        f"learning_rate: 3.0e-3\nrollout_actors: 2\nreward_funcs: ['{tmp_path / 'reward.py'}:by_characters']\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    train = ["-m", "dlm_rl.cli", "train", str(tmp_path / "recipe.yaml"), "--output_dir"]
    launches = {"single": [sys.executable, *train, str(tmp_path / "single")],
                "parallel": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={WORLD}", *train, str(tmp_path / "parallel")]}
    metrics = {}
    for name, command in launches.items():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, f"{name}: {done.stderr[-4000:]}"
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        metrics[name] = [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]
    single, parallel = metrics["single"], metrics["parallel"]
    assert [m["step"] for m in parallel] == [0, 1, 2] and all("loss" in m for m in parallel[1:])
    for one, two in zip(single, parallel):
        assert one.keys() == two.keys()
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("use_lora", [False, True])
def test_mdm_under_fsdp_saves_whole_weights_and_resumes_exactly(tmp_path, use_lora):
    """MDM SFT sharded with FSDP2 over two gloo processes, through `dlm-rl train`: the saved weights (or adapter) are
    whole, with the names and shapes a one-process run saves, and a run resumed from checkpoint-2 logs the same
    losses and saves the same tensors as the run that went on."""
    from safetensors.torch import load_file

    recipe = ("trainer: mdm\nmodel: tiny\ntiny_hidden_size: 32\ntiny_num_layers: 2\ntask: addition3\n"
              "train_size: 32\nmax_steps: 4\nsave_steps: 2\nper_device_train_batch_size: 2\nlearning_rate: 1.0e-2\n"
              f"logging_steps: 1\nseed: 3\nuse_cpu: true\nuse_lora: {str(use_lora).lower()}\nlora_r: 4\n")
    (tmp_path / "single.yaml").write_text(recipe)
    (tmp_path / "fsdp.yaml").write_text(recipe + "fsdp: true\nfsdp_config: {fsdp_version: 2, state_dict_type: "
                                        "FULL_STATE_DICT, transformer_layer_cls_to_wrap: [LlamaDecoderLayer]}\n")
    train = ["-m", "dlm_rl.cli", "train", str(tmp_path / "fsdp.yaml"), "--output_dir"]

    launch(tmp_path, [*TORCHRUN, *train, str(tmp_path / "whole")])
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    launch(tmp_path, [*TORCHRUN, *train, str(tmp_path / "resumed"), "--resume"])
    launch(tmp_path, [sys.executable, "-m", "dlm_rl.cli", "train", str(tmp_path / "single.yaml"), "--output_dir",
                      str(tmp_path / "single"), "--max_steps", "1"])

    def saved(name):
        (file,) = [f for f in os.listdir(tmp_path / name) if f.endswith(".safetensors")]
        return load_file(str(tmp_path / name / file))

    def losses(name):
        state = json.loads((tmp_path / name / "checkpoint-4" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    whole, resumed, single = saved("whole"), saved("resumed"), saved("single")
    assert {k: v.shape for k, v in whole.items()} == {k: v.shape for k, v in single.items()}
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert len(losses("whole")) == 4 and losses("resumed") == losses("whole")


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"),
                                        ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "configs", "accelerate", f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == 8
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_validate_and_carry_their_launch_command_and_memory_estimate(recipe):
    from dlm_rl.recipe import parse_recipe

    path = os.path.join(ROOT, "recipes", f"{recipe}.yaml")
    with open(path) as f:
        header = [line for line in f if line.startswith("#")]
    launch = [line for line in header if line.startswith("# accelerate launch --config_file configs/accelerate/")]
    assert launch and launch[0].split()[-1] == f"recipes/{recipe}.yaml", "the data-parallel launch command"
    config_file = launch[0].split("--config_file ")[1].split()[0]
    assert config_file == "configs/accelerate/ddp.yaml", "the RL trainers shard themselves (fsdp: true)"
    module, config = parse_recipe(path)
    assert callable(module.run)
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        assert f"`{recipe}.yaml`" in f.read(), "docs/scaling.md works out this recipe's memory per GPU"


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_rl_trainers_refuse_a_sharded_launch(monkeypatch, variable, name):
    from dlm_rl import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=f"accelerate {name} config.*ddp.yaml"):
        distributed.setup()


def gathered(value) -> list:
    values = [None] * WORLD
    torch.distributed.all_gather_object(values, value)
    return values


def _scatter_outcome(distributed) -> str:
    """What `scatter_from_main` does on this rank when making the parts fails on rank 0."""
    def fail():
        raise ValueError("no rollouts")

    try:
        distributed.scatter_from_main(fail)
    except (ValueError, distributed.MainProcessFailed) as error:
        return f"{type(error).__name__}: {error}"
    return "returned"


def _worker(directory: str, model: str = "tiny") -> None:
    """One rank. Rank 0 first takes every single-process step on the global batches (before joining the process
    group, so the trainers run their one-process code); then every rank takes its share and rank 0 writes the
    differences. On the tiny model the ranks also take the MDM steps and the mistakes the test must catch."""
    from dlm_rl import distributed

    torch.set_num_threads(1)
    BASE["model"] = model
    main = os.environ["RANK"] == "0"
    chosen = (lambda name: True) if model == "tiny" else (lambda name: "fsdp" in name)  # SmolLM2: the sharded ones
    inputs = reference = None
    if main:
        inputs = build_inputs()
        single = rl_cases(inputs, lambda items: items, world=1)
        reference = {name: case() for name, case in single.items() if chosen(name)}
    distributed.setup()
    shared = [inputs]
    torch.distributed.broadcast_object_list(shared, src=0)
    inputs = shared[0]
    cases = {name: case for name, case in rl_cases(inputs, distributed.share, WORLD).items() if chosen(name)}
    results = {"exact": {}, "broken": {"gradients_not_summed": {}, "mean_of_per_rank_means": {}}}
    for name, case in cases.items():
        grads = case()
        if main:
            results["exact"][name] = (max_diff(grads, reference[name]),
                                      max(float(g.abs().max()) for g in reference[name].values()))
    if model == "tiny":
        _mdm_and_mistakes(directory, inputs, cases, reference, results)
    if main:
        with open(os.path.join(directory, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


def _mdm_and_mistakes(directory, inputs, cases, reference, results) -> None:
    """The MDM steps, the ranks' masks and data, the scatter from rank 0, and the RL cases with the mistakes the
    test must catch, into `results`."""
    from dlm_rl import distributed, sharding

    main = distributed.is_main()
    work = os.path.join(directory, f"work{distributed.rank()}")
    single, parallel = mdm(inputs, distributed.share, work)
    results["exact"]["mdm"] = (max_diff(parallel, single), max(float(g.abs().max()) for g in single.values()))
    single, parallel = mdm(inputs, distributed.share, work, sync=False)
    results["broken"]["gradients_not_summed"]["mdm"] = max_diff(parallel, single)
    masks = gathered(mdm_first_masks(inputs, work))
    results["mdm_ranks_draw_the_same_masks"] = all(torch.equal(masks[0], m) for m in masks[1:])
    seen = gathered(mdm_epoch_rows(work))
    results["mdm_epoch_rows"] = [len(part) for part in seen] + [len({row for part in seen for row in part})]

    results["scattered"] = gathered(distributed.scatter_from_main(lambda: [f"part {r}" for r in range(WORLD)]))
    results["main_fails_while_scattering"] = gathered(_scatter_outcome(distributed))

    real_sum, real_all_sum, real_dist = distributed.sum_gradients, distributed.all_sum, sharding.dist

    def averaged(parameters):  # DDP's average of the gradients, of losses normalised on each rank
        parameters = [p for p in parameters if p.requires_grad]
        real_sum(parameters)
        for p in parameters:
            p.grad /= WORLD

    class NoSum:  # the sharded sum without its all-reduce: each rank keeps its own gradients
        all_reduce = staticmethod(lambda tensor: None)

    mutations = {"gradients_not_summed": {"sum_gradients": lambda parameters: None, "sharding.dist": NoSum},
                 "mean_of_per_rank_means": {"sum_gradients": averaged, "all_sum": lambda value: value}}
    for mutation, patch in mutations.items():
        for name in ("tracerl", "tracerl_fsdp_value_model", "tracerl_fsdp_full", "vrpo", "vrpo_fsdp_lora",
                     "vrpo_fsdp_full", "didi_student", "didi_discriminator", "didi_fsdp_student",
                     "didi_fsdp_student_lora", "didi_fsdp_discriminator"):  # both ranks have rows
            for attribute, function in patch.items():
                setattr(*((sharding, "dist") if attribute == "sharding.dist" else (distributed, attribute)), function)
            try:
                grads = cases[name]()
            finally:
                distributed.sum_gradients, distributed.all_sum, sharding.dist = real_sum, real_all_sum, real_dist
            if main:
                results["broken"][mutation][name] = max_diff(grads, reference[name])


def _bfloat16_worker(directory: str) -> None:
    """One rank of a VRPO step at lr 5e-7 on a bfloat16 tiny model sharded with FSDP2, with float32 master weights
    and with the bfloat16 weights themselves (`master_weights: model`); rank 0 writes how far the weights moved."""
    from dlm_rl import distributed, sharding
    from dlm_rl.rl.vrpo import PreferenceEstimator, collate_pairs
    from dlm_rl.trainers.optimization import hold_master_weights
    from dlm_rl.trainers.vrpo import VRPOConfig, _update

    torch.set_num_threads(1)
    distributed.setup(fsdp=True)
    results = {}
    for master_weights in ("float32", "model"):
        torch.manual_seed(0)
        model = base().to(torch.bfloat16)
        frozen = copy.deepcopy(model).requires_grad_(False)
        config = VRPOConfig(model="tiny", use_lora=False, learning_rate=5e-7, n_t=2, micro_batch_pairs=1,
                            master_weights=master_weights, fsdp=True)
        hold_master_weights(config, model)
        sharding.shard(model)
        parameters = [p for p in model.parameters() if p.requires_grad]
        before = [p.full_tensor().float() for p in parameters]
        pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
        chosen, rejected = collate_pairs(model.tokenizer, distributed.share(pairs), 8)
        sharding.gather(model)
        _update(model, torch.optim.AdamW(parameters, lr=5e-7), parameters, chosen, rejected, PreferenceEstimator(2),
                config, torch.Generator().manual_seed(distributed.rank()), frozen, NonFiniteLoss(1, "VRPO"))
        changes = torch.cat([(p.full_tensor().float() - old).abs().flatten() for p, old in zip(parameters, before)])
        moved = changes[changes > 0]
        results[master_weights] = {"dtype": str(parameters[0].dtype), "moved": float((changes > 0).float().mean()),
                                   "median_step": float(moved.median()) if len(moved) else 0.0}
    if distributed.is_main():
        with open(os.path.join(directory, "bfloat16.json"), "w") as f:
            json.dump(results, f)


def test_fsdp_keeps_an_update_of_5e_7_on_bfloat16_weights(tmp_path):
    """Sharded (FSDP2, two gloo processes, bfloat16 gathered weights) full fine-tuning of a bfloat16 model at lr 5e-7:
    with float32 master weights AdamW's first step moves nearly every weight by the learning rate; holding the
    bfloat16 weights themselves (the control), it rounds the update away."""
    launch(tmp_path, [*TORCHRUN, os.path.abspath(__file__), str(tmp_path), "bfloat16"])
    results = json.loads((tmp_path / "bfloat16.json").read_text())
    assert results["float32"]["dtype"] == "torch.float32" and results["model"]["dtype"] == "torch.bfloat16"
    assert results["float32"]["moved"] > 0.9
    assert results["float32"]["median_step"] == pytest.approx(5e-7, rel=0.01)
    assert results["model"]["moved"] < 0.02


if __name__ == "__main__":
    if sys.argv[2:] == ["bfloat16"]:
        _bfloat16_worker(sys.argv[1])
    else:
        _worker(*sys.argv[1:])


FSDP_RECIPES = {
    "vrpo_full": "trainer: vrpo\nmodel: tiny\ndataset_path: PAIRS\nuse_lora: false\nprompts_per_step: 5\nn_t: 2\n"
                 "gen_length: 4\neval_size: 4\n",
    "vrpo_lora": "trainer: vrpo\nmodel: tiny\ndataset_path: PAIRS\nprompts_per_step: 5\nn_t: 2\ngen_length: 4\n"
                 "eval_size: 4\nlora_r: 4\n",
    "tracerl_value_model": "trainer: tracerl\nmodel: tiny\ndataset_name: addition3\ntrain_size: 64\n"
                           "prompts_per_step: 3\nnum_generations: 4\nvalue_model: true\nreward_funcs: [REWARD]\n"
                           "eval_size: 4\nlora_r: 4\n",
    "didi": "trainer: didi\nteacher: tiny\ndataset_name: addition3\ntrain_size: 64\nprompts_per_step: 3\n"
            "group_size: 2\nrollout_steps: 2\neval_samples: 4\neval_nfe: 2\nema: 0.9\n",
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=[pytest.mark.slow] if case == "vrpo_lora" else [])
                                  for case in FSDP_RECIPES])  # VRPO with LoRA: `make test-slow`
def test_rl_trainers_under_fsdp_train_and_save_whole_weights(tmp_path, case):
    """VRPO (on a pairs file), TraceRL (with its value model) and DiDi sharded with FSDP2 over two gloo processes
    through `dlm-rl train`: they train, and the saved weights (or adapter, value model, discriminator) are whole,
    with the names and shapes a one-process run saves."""
    from safetensors.torch import load_file

    recipe = fsdp_recipe(tmp_path, case) + "max_steps: 2\neval_steps: 1\nreport_to: none\n"
    (tmp_path / "single.yaml").write_text(recipe)
    (tmp_path / "fsdp.yaml").write_text(recipe + "fsdp: true\n")

    train = ["-m", "dlm_rl.cli", "train"]
    launch(tmp_path, [*TORCHRUN, *train, str(tmp_path / "fsdp.yaml"), "--output_dir", str(tmp_path / "fsdp")])
    launch(tmp_path, [sys.executable, *train, str(tmp_path / "single.yaml"), "--output_dir",
                      str(tmp_path / "single"), "--max_steps", "1"])

    def saved(name):
        (file,) = [f for f in os.listdir(tmp_path / name / "final") if f.endswith(".safetensors")]
        return load_file(str(tmp_path / name / "final" / file))

    sharded, single = saved("fsdp"), saved("single")
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in single.items()}
    lines = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(line["grad_norm"]) for line in lines[1:])
    if case in ("vrpo_full", "didi"):  # the saved model loads and has moved from the recipe's initial tiny model
        from dlm_rl.models import load

        trained = dict(load(str(tmp_path / "fsdp" / "final")).named_parameters())
        initial = dict(tiny_default().named_parameters())
        assert trained.keys() == initial.keys()
        assert any(not torch.equal(trained[name], initial[name]) for name in initial)
    else:  # LoRA B starts at zero: a trained adapter has moved it
        assert any(float(tensor.abs().max()) > 0 for name, tensor in sharded.items() if "lora_B" in name)
    extra = {"tracerl_value_model": "value_model.pt", "didi": "discriminator.pt"}
    if case in extra:
        values = [torch.load(tmp_path / name / "final" / extra[case]) for name in ("fsdp", "single")]
        assert {k: v.shape for k, v in values[0].items()} == {k: v.shape for k, v in values[1].items()}
        assert all(type(v) is torch.Tensor for v in values[0].values())


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]


def launch(directory, command, timeout: int = 600) -> None:
    """Run `command` (a torchrun launch, or one process) in `directory` with this checkout on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=directory)
    assert done.returncode == 0, done.stderr[-4000:]


def fsdp_recipe(directory, case: str) -> str:
    """FSDP_RECIPES[case] with its data (a pairs file) and reward (a file) written in `directory`."""
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(20)]
    (directory / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in pairs))
    (directory / "digits.py").write_text(  # a reward that differs between an untrained model's samples
        "def digits(prompts, completions, **columns):\n    return [sum(c.isdigit() for c in x) for x in completions]\n")
    return FSDP_RECIPES[case].replace("REWARD", f"{directory / 'digits.py'}:digits").replace(
        "PAIRS", str(directory / "pairs.jsonl"))


def tiny_default():
    from dlm_rl.models.tiny import tiny_model

    return tiny_model()  # the recipe's `model: tiny`


def test_fsdp_halves_the_per_rank_memory_of_weights_gradients_and_adamw():
    """scripts/fsdp_memory.py on the tiny model: one VRPO step's weights, gradients and AdamW state per rank, two
    processes against one (data parallelism would hold all of it on each: a ratio of 1)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fsdp_memory.py")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["setting"] for row in rows] == ["full", "lora"]
    for row in rows:
        assert row["one_process"]["optimizer"] > 0 and row["one_process"]["gradients"] > 0
        assert 0.49 < row["ratio"] < 0.52, row


@pytest.mark.parametrize("case, fsdp", [("tracerl_value_model", False), ("tracerl_value_model", True),
                                        pytest.param("vrpo_full", True, marks=pytest.mark.slow), ("didi", True)])
def test_two_process_runs_resume_exactly_and_a_two_process_checkpoint_resumes_in_one(tmp_path, case, fsdp):
    """Under torchrun (two gloo processes; data parallel, or sharded with FSDP2), a run resumed from checkpoint-2
    logs the same metrics at steps 3 to 5 as the run that went on. Each process saved its own generators and RNG
    states; the sharded weights and AdamW states went through torch.distributed.checkpoint, which also loads them
    into one process."""
    recipe = fsdp_recipe(tmp_path, case) + ("max_steps: 5\neval_steps: 2\nsave_steps: 2\nsave_total_limit: null\n"
                                             f"report_to: none\nfsdp: {str(fsdp).lower()}\n")
    (tmp_path / "recipe.yaml").write_text(recipe)
    train = ["-m", "dlm_rl.cli", "train", str(tmp_path / "recipe.yaml"), "--output_dir"]

    def metrics(name):
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]

    launch(tmp_path, [*TORCHRUN, *train, str(tmp_path / "whole")])
    saved = sorted(os.listdir(tmp_path / "whole" / "checkpoint-2"))
    assert {"rank-0.pt", "rank-1.pt", "state.pt", "manifest.json"} <= set(saved)
    assert ("sharded" in saved) == fsdp
    for name in ("resumed", "one"):
        shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / name / "checkpoint-2")
    launch(tmp_path, [*TORCHRUN, *train, str(tmp_path / "resumed"), "--resume"])
    whole, resumed = metrics("whole"), metrics("resumed")
    assert [line["step"] for line in resumed] == [3, 4, 5]
    assert resumed == whole[3:]
    launch(tmp_path, [sys.executable, *train, str(tmp_path / "one"), "--resume", "--max_steps", "3"])
    (line,) = metrics("one")
    assert line["step"] == 3 and math.isfinite(line["grad_norm"])
