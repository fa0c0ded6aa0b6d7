"""DiDi-Instruct trainer: distil a many-step masked diffusion teacher into a few-step student (`dlm_rl.rl.didi`).

Each step: a batch of `prompts_per_step` rows of the task (for unconditional text, the fixed prompt and a real
text), each prompt repeated `group_size` times; one τ per group, from Beta(tau_beta_a, tau_beta_b) on [tau_min,
tau_max]. The student rolls out all-mask → x_τ → x_0 (or `rollout_steps` ancestral steps); x_0 and the real texts
are noised at τ. The discriminator first takes a BCE step on real vs student (its gradient clipped); then its
clipped mean logit on the noised student sample, read at time τ (with `likelihood_prior`, on top of the teacher's
pseudo-log-likelihood of it; less β · log q(x)/L with `sequence_entropy_coef` β) is the reward, normalised within
each group. The student's loss is −ω(τ) · Â · log q(x), log q summed over the tokens, + kl_coef · Σ_states
KL(teacher ‖ student) − entropy_coef · Σ_states H (each state's mean over its masked positions), +
conditional_kl_coef · the mean over the tokens each step reveals of KL(q_i ‖ the teacher's conditional given the
tokens revealed with it).
An EMA of the student is kept and saved. Every part can be switched off for ablation. The student is evaluated
with plain ancestral sampling at `eval_nfe` steps.

Under `torchrun` / `accelerate launch` (`dlm_rl.distributed`) every rank takes its share of the step's prompts
(whole groups) with its own random stream, the losses are divided by the global row and token counts, and the
gradients of the student and of the discriminator are summed once per step; rank 0 logs, evaluates and saves.

The step's formulas, which paper choice each setting follows and the options beyond it: docs/algorithms.md,
section 6.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from dlm_rl import distributed, sharding
from dlm_rl.checkpoint import (
    CheckpointArguments,
    checkpoint_due,
    prepare_output_dir,
    save_checkpoint,
    start_run,
    write_directory,
)
from dlm_rl.data.sources import completion_rows, rename_task
from dlm_rl.guards import NonFiniteArguments, NonFiniteLoss
from dlm_rl.hub import HubArguments, push_final
from dlm_rl.models.lora import LoraArguments
from dlm_rl.rl.didi import (
    HEADS,
    Discriminator,
    conditional_kl,
    discriminator_loss,
    discriminator_reward,
    grouped_advantages,
    kl_and_entropy,
    noise_at,
    rollout,
    sample_tau,
    save_discriminator,
    time_weight,
)
from dlm_rl.run_log import ReportArguments
from dlm_rl.trainers.api import Callbacks, RLTrainer
from dlm_rl.trainers.optimization import (
    OptimizationArguments,
    advance,
    enable_gradient_checkpointing,
    hold_master_weights,
    lr_scheduler,
    scheduled,
)
from dlm_rl.trainers.online import require_positive, require_range

logger = logging.getLogger(__name__)


@dataclass
class DiDiConfig(CheckpointArguments, ReportArguments, HubArguments, OptimizationArguments, LoraArguments,
                 NonFiniteArguments):
    """DiDi-Instruct settings; every field can be a recipe key."""

    teacher: str = "testbed:facts-teacher"
    """The teacher (testbed:NAME, a dlm-rl directory or a hub id); the student and the discriminator start as
    copies of it."""
    trust_remote_code: bool = False
    """Allow a LLaDA/Dream/SDAR/MDLM checkpoint's own modelling code."""
    dataset_name: str | None = None
    """A testbed task (dlm_rl.testbed.TASKS) giving prompts and real texts, or a hub dataset with `prompt` and
    `completion` (or conversational `messages`) rows; 'facts' when no dataset_path is set."""
    dataset_config: str | None = None
    """The hub dataset's configuration."""
    dataset_train_split: str = "train"
    """The split to train on (a hub dataset, or a directory written by save_to_disk)."""
    task: str | None = None
    """Deprecated: dataset_name (the same values)."""
    dataset_path: str | None = None
    """A local json/jsonl/parquet/csv file or saved dataset directory with 'prompt' and 'completion' (or
    'messages') columns."""
    train_size: int = 50000
    """Rows drawn from a testbed task."""
    gen_length: int | None = None
    """Response length; a testbed task supplies its own."""
    prompts_per_step: int = 8
    """Distinct rows (prompts and real texts) per step."""
    group_size: int = 4
    """Student samples per prompt (G); rewards are normalised within each group."""
    max_steps: int = 1000
    """Training steps (each: one discriminator update and, after the warmup, one student update)."""
    learning_rate: float = 1e-5
    """Student learning rate (AdamW)."""
    discriminator_learning_rate: float = 1e-5
    """Discriminator learning rate (AdamW)."""
    discriminator_max_grad_norm: float = 1.0
    """Discriminator gradient clipping."""
    weight_decay: float = 0.0
    """Student AdamW weight decay."""
    max_grad_norm: float = 0.5
    """Student gradient clipping."""
    discriminator_blocks: int = 4
    """Trainable last blocks of the discriminator."""
    discriminator_head: str = "mlp"
    """The discriminator's per-token head: "mlp" (the paper's spectral-norm Linear–SiLU–Linear) or "linear"
    (zero-initialised, so D = 0 at the start)."""
    discriminator_time_input: bool = True
    """Feed the diffusion time of the state the discriminator reads through its trainable blocks
    (`dlm_rl.rl.didi.Discriminator`)."""
    discriminator_warmup_steps: int = 0
    """Discriminator-only steps before the student's first update."""
    likelihood_prior: float = 0.0
    """Weight w of the teacher's pseudo-log-likelihood of the visible tokens added to the discriminator's logit as
    a prior for the log density ratio (`dlm_rl.rl.didi.Discriminator`); 0 is the paper's discriminator."""
    likelihood_folds: int = 4
    """Teacher forwards per discriminator call for the likelihood prior: each scores one random fold of the
    visible response tokens, masked again."""
    sequence_entropy_coef: float = 0.0
    """β: the reward gets −β · log q(x)/L, the student's own per-token log-likelihood of its rollout — a
    sequence-level entropy bonus, the −log q half of the log density ratio whose log p half the likelihood prior
    approximates. It keeps the student from collapsing onto the few samples the teacher finds likeliest."""
    rollout_steps: int = 2
    """The student's rollout: 2 is DiDi-Instruct's all-mask → x_τ → x_0 (τ also the discriminator's time); more
    rolls out the ancestral sampler's own steps (as at evaluation), the discriminator scoring x_0 noised at τ."""
    label_smoothing: float = 0.1
    """The discriminator's targets are 1 − s (real) and s (student) for smoothing s."""
    tau_min: float = 0.02
    """Lowest τ, the rollout's intermediate time, drawn per group in [tau_min, tau_max]."""
    tau_max: float = 0.98
    """Highest τ."""
    tau_beta_a: float = 1.0
    """τ = tau_min + (tau_max − tau_min) · u with u ~ Beta(tau_beta_a, tau_beta_b); Beta(1, 1) is uniform."""
    tau_beta_b: float = 1.0
    """The second parameter of τ's Beta distribution."""
    tau_importance_weight: bool = False
    """Weight each sample by ω(τ)/π(τ), π the density τ is drawn from, instead of ω(τ)."""
    use_discriminator: bool = True
    """Ablation switch: False drops the discriminator reward (the student learns from the regulariser alone)."""
    grouped_normalisation: bool = True
    """Ablation switch: False uses the raw clipped reward as the advantage."""
    use_time_weight: bool = True
    """Ablation switch: False sets ω(t) = 1."""
    omega_min: float = 0.1
    """Lower clamp of the time weight ω(τ) = 1/τ."""
    omega_max: float = 10.0
    """Upper clamp of ω(τ)."""
    reward_clip: float = 8.0
    """The discriminator's per-token logits are clipped to ±this before they are averaged into the reward."""
    advantage_clip: float = 3.0
    """Group-normalised advantages are clipped to ±this."""
    kl_coef: float = 0.01
    """Weight of KL(teacher ‖ student) at both rollout states (0 disables)."""
    entropy_coef: float = 0.001
    """Weight of the student's entropy bonus (0 disables)."""
    conditional_kl_coef: float = 0.0
    """Weight of KL(q_i ‖ p(x_i | the step's state and the other tokens it reveals)) at the tokens each rollout
    step reveals (`dlm_rl.rl.didi.conditional_kl`): the teacher's joint over the tokens a step reveals together,
    which the few-step student draws independently (0 disables)."""
    conditional_folds: int = 4
    """Teacher forwards per rollout step for `conditional_kl_coef`: each masks one random fold of the step's
    revealed tokens again, so a token is scored given the others outside its fold."""
    ema: float = 0.999
    """EMA decay of the student's weights (0 disables: the final student is the last iterate)."""
    eval_steps: int = 100
    """Evaluate the student's samples every this many steps (and before and after)."""
    eval_samples: int = 64
    """Samples per evaluation (prompts cycled from the training rows)."""
    eval_batch_size: int = 64
    """Evaluation samples drawn at once (the evaluation's memory)."""
    fsdp: bool = False
    """Under torchrun / accelerate, shard the student, the discriminator and the EMA (weights, gradients, AdamW
    state) over the processes (FSDP2: `dlm_rl.sharding`) instead of holding them whole on each; the frozen teacher
    stays whole."""
    eval_nfe: int = 16
    """Ancestral steps of the periodic evaluation."""
    output_dir: str = "runs/didi"
    """Where metrics.jsonl, the tracker logs, curves.png, checkpoints and the final student go."""
    seed: int = 0
    """Seed of the data order, the rollouts and τ."""

    def __post_init__(self):
        super().__post_init__()
        rename_task(self)
        if self.dataset_name is not None and self.dataset_path is not None:
            raise ValueError("set one of dataset_name (a testbed task) and dataset_path, not both")
        if self.dataset_name is None and self.dataset_path is None:
            self.dataset_name = "facts"
        if not 0 < self.tau_min < self.tau_max < 1:
            raise ValueError(f"need 0 < tau_min < tau_max < 1, got {self.tau_min}, {self.tau_max}")
        if self.group_size < 1 or self.prompts_per_step < 1:
            raise ValueError("group_size and prompts_per_step must be at least 1")
        if self.grouped_normalisation and self.group_size < 2:
            raise ValueError("grouped normalisation needs group_size >= 2")
        if self.rollout_steps < 2:
            raise ValueError(f"rollout_steps must be at least 2, got {self.rollout_steps}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not self.use_discriminator and self.kl_coef == 0 and self.conditional_kl_coef == 0:
            raise ValueError("with use_discriminator false the student learns from kl_coef and conditional_kl_coef "
                             "alone; set one above 0")
        require_positive(self, "max_steps", "train_size", "gen_length", "eval_steps", "eval_samples",
                         "eval_batch_size", "eval_nfe", "likelihood_folds", "conditional_folds")
        require_range(self, learning_rate=(0, None), discriminator_learning_rate=(0, None), weight_decay=(0, None),
                      discriminator_warmup_steps=(0, None), kl_coef=(0, None), entropy_coef=(0, None),
                      label_smoothing=(0, 0.5), likelihood_prior=(0, None), tau_beta_a=(0, None),
                      tau_beta_b=(0, None), sequence_entropy_coef=(0, None),
                      conditional_kl_coef=(0, None))
        for name in ("max_grad_norm", "discriminator_max_grad_norm"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if self.discriminator_head not in HEADS:
            raise ValueError(f"discriminator_head must be one of {HEADS}, got {self.discriminator_head!r}")
        if min(self.tau_beta_a, self.tau_beta_b) <= 0:
            raise ValueError(f"tau_beta_a and tau_beta_b must be positive, got {self.tau_beta_a}, {self.tau_beta_b}")
        if self.dataset_path is not None:
            from dlm_rl.data.files import refuse_empty_file

            refuse_empty_file(self.dataset_path, "dataset_path")


def run(config: DiDiConfig, *, model=None, train_dataset=None, eval_dataset=None, callbacks=None) -> dict:
    """Distil; returns the final metrics line (also the last line of metrics.jsonl). `model` (the teacher, a
    DiffusionLM), `train_dataset` (prompt and completion rows, in place of the config's data) and `callbacks` as
    `DiDiTrainer` takes them."""
    from dlm_rl.data.collate import DiffusionCollator
    from dlm_rl.models.lora import add_lora
    from dlm_rl.model_spec import known_tokenizer, resolve_model
    from dlm_rl.testbed import TASKS
    from dlm_rl.trainers.online import PromptStream

    prepare_output_dir(config)
    if eval_dataset is not None:
        raise ValueError("DiDi evaluates the student's own samples: it takes no eval_dataset")
    source = train_dataset if train_dataset is not None else config.dataset_path
    name = None if source is not None else config.dataset_name
    task = name if name in TASKS else None  # a testbed task: the samples' validity is checked too
    tokenizer = None if task is not None else model.tokenizer if model is not None else known_tokenizer(config.teacher)
    rows, gen_length = completion_rows(name, source, config.train_size, config.seed, config.gen_length, tokenizer,
                                       config.dataset_config, config.dataset_train_split)
    torch.manual_seed(config.seed)
    device = distributed.setup(config.fsdp)
    main = distributed.is_main()
    teacher = (model or resolve_model(config.teacher, trust_remote_code=config.trust_remote_code)).to(device)
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    if config.use_lora:
        add_lora(student, config)
    distributed.broadcast_parameters(student.parameters())  # the same LoRA initialisation on every rank
    discriminator = Discriminator(teacher, config.discriminator_blocks, config.likelihood_prior,
                                  config.likelihood_folds, config.discriminator_head, config.discriminator_time_input)
    distributed.broadcast_parameters(discriminator.parameters())  # the same head and time embedding on every rank
    hold_master_weights(config, student, discriminator)
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(config.ema)) if config.ema else None
    if config.fsdp and distributed.world_size() > 1:
        for module in (student, discriminator) + ((ema.module,) if ema is not None else ()):
            sharding.shard(module)
    student_parameters = [p for p in student.parameters() if p.requires_grad]
    student_optimizer = torch.optim.AdamW(student_parameters, lr=config.learning_rate,
                                          weight_decay=config.weight_decay)
    scheduler = lr_scheduler(config, student_optimizer)
    discriminator_optimizer = torch.optim.AdamW([p for p in discriminator.parameters() if p.requires_grad],
                                                lr=config.discriminator_learning_rate)
    collate = DiffusionCollator(teacher.tokenizer, gen_length)
    stream = PromptStream(rows, config.prompts_per_step, config.seed)
    generator = torch.Generator(device).manual_seed(config.seed + distributed.rank())
    nonfinite = NonFiniteLoss(config.max_nonfinite_steps, "DiDi")
    state = {"student": student, "student_optimizer": student_optimizer, "discriminator": discriminator,
             "discriminator_optimizer": discriminator_optimizer, "generator": generator, "prompts": stream,
             "nonfinite": nonfinite}
    if ema is not None:
        state["ema"] = ema
    if scheduled(config):
        state["scheduler"] = scheduler
    done, log = start_run(config, state, main)  # steps done before (0 for a new run)
    events = Callbacks(callbacks, config, done)

    evaluated = ema.module if ema is not None else student

    def evaluate() -> dict:
        return _evaluate(evaluated, config, rows, gen_length, device, task)

    line = {"step": done}
    if not config.resume:
        sharding.gather(evaluated)  # every rank: rank 0 evaluates the whole weights
        if main:
            line.update(evaluate())
            log.log(line)
        sharding.release(evaluated)
    stepped = False
    try:
        events.event("on_train_begin", model=student)
        steps = range(done + 1, config.max_steps + 1)
        for step in (bar := tqdm(steps, desc="didi", initial=done, total=config.max_steps, disable=not main)):
            start = time.perf_counter()
            rows_now = distributed.share(stream.next())
            batch = {k: v.to(device) for k, v in collate(rows_now).items()}
            sharding.gather(student)
            sharding.gather(discriminator)
            line = {"step": step, **_step(student, teacher, discriminator, student_optimizer, discriminator_optimizer,
                                          student_parameters, batch, rows_now, config, generator, nonfinite, task,
                                          update_student=step > config.discriminator_warmup_steps)}
            line["learning_rate"] = advance(scheduler)
            if ema is not None and step > config.discriminator_warmup_steps:
                sharding.release(student)  # the EMA averages shards
                ema.update_parameters(student)
            line["time/step"] = time.perf_counter() - start
            stepped = True
            due = step % config.eval_steps == 0 or step == config.max_steps
            if due:
                sharding.gather(evaluated)  # every rank: rank 0 evaluates the whole weights
            if not main:
                sharding.release(evaluated)
                if checkpoint_due(config, step):
                    save_checkpoint(config, step, state)  # every process saves its own part
                if events.step_end(line):
                    break
                continue
            if due:
                line.update(evaluate())
                sharding.release(evaluated)
            bar.set_postfix(reward=f"{line['reward']:.3f}", d_loss=f"{line['discriminator_loss']:.3f}")
            log.log(line)
            if checkpoint_due(config, step):
                save_checkpoint(config, step, state)
                events.event("on_save")
            if events.step_end(line):
                logger.info("step %d: a callback stopped the run", step)
                break
        events.event("on_train_end", model=student)
    finally:
        if main and stepped and not sharding.is_sharded(evaluated):  # sharded weights need every rank
            write_directory(os.path.join(config.output_dir, "final"),
                            functools.partial(write_final, model=evaluated, discriminator=discriminator))
        if main:
            log.close(curve=("reward", "discriminator_loss", "eval/validity"))
    if stepped and sharding.is_sharded(evaluated):
        weights, discriminator_weights = sharding.whole_state_dict(evaluated), sharding.whole_state_dict(discriminator)
        if main:
            write_directory(os.path.join(config.output_dir, "final"), functools.partial(
                write_final, model=evaluated, discriminator=discriminator, weights=weights,
                discriminator_weights=discriminator_weights))
    if main and stepped:
        push_final(config, os.path.join(config.output_dir, "final"))
    return line


def write_final(directory: str, model, discriminator, weights=None, discriminator_weights=None) -> None:
    """The final student (the EMA's, if any; `weights`: its state dict gathered from shards) and the
    discriminator in `directory`."""
    model.save_pretrained(directory, **({"state_dict": weights} if weights is not None else {}))
    save_discriminator(discriminator, directory, discriminator_weights)


def _step(student, teacher, discriminator, student_optimizer, discriminator_optimizer, student_parameters, batch,
          rows, config: DiDiConfig, generator, nonfinite: NonFiniteLoss, task: str | None, *,
          update_student: bool) -> dict:
    """One discriminator update, then (unless still warming the discriminator up) one student update on the reward
    the updated discriminator gives; `nonfinite` skips either when its loss is NaN or inf. `rows` are the batch's
    dataset rows, of testbed task `task` (then the samples' validity is logged) or of a dataset (None)."""
    group = config.group_size
    repeated = {k: v.repeat_interleave(group, 0) for k, v in batch.items()}
    response_mask, attention_mask = repeated["response_mask"], repeated["attention_mask"]
    tau, density = sample_tau(len(batch["input_ids"]), config.tau_min, config.tau_max,
                              (config.tau_beta_a, config.tau_beta_b), generator, response_mask.device)
    tau, density = tau.repeat_interleave(group).float(), density.repeat_interleave(group).float()
    student.train()
    with torch.set_grad_enabled(update_student):
        sample = rollout(student, repeated["input_ids"], attention_mask, response_mask, tau, config.rollout_steps,
                         generator)
    fake, fake_masked = noise_at(sample.final, response_mask, tau, student.mask_token_id, generator)
    real, real_masked = noise_at(repeated["input_ids"], response_mask, tau, student.mask_token_id, generator)
    discriminator.train()
    line = {"discriminator_loss": _discriminator_update(discriminator, discriminator_optimizer, real, real_masked,
                                                       fake, fake_masked, tau, attention_mask, response_mask,
                                                       config, generator, nonfinite)}
    sharding.gather(discriminator)  # the updated weights, whole again
    discriminator.eval()  # read, not trained: no spectral-norm power iteration, no dropout
    with torch.no_grad():
        fake_logits = discriminator(fake, attention_mask, time=tau, response_mask=response_mask, generator=generator)
    reward = discriminator_reward(fake_logits, fake_masked, config.reward_clip)
    share = len(reward) / distributed.all_sum(len(reward))  # this rank's fraction of the step's rows
    line.update(distributed.all_sum({"reward": float(reward.mean()) * share, "tau": float(tau.mean()) * share}))
    if task is not None:
        line.update(_reward_against_validity(sample.final, response_mask, reward, student.tokenizer, task,
                                             [row for row in rows for _ in range(group)]))
    if update_student:
        line.update(_student_update(student, teacher, student_optimizer, student_parameters, sample, reward,
                                    response_mask, attention_mask, config, nonfinite, generator, density))
    line["guard/nonfinite_steps"] = nonfinite.count
    return line


def _discriminator_update(discriminator, optimizer, real, real_masked, fake, fake_masked, tau, attention_mask,
                          response_mask, config: DiDiConfig, generator, nonfinite: NonFiniteLoss) -> float:
    """One BCE step of the discriminator on real texts vs the student's samples, both noised at τ, its gradient
    clipped to `discriminator_max_grad_norm`; returns the loss over all ranks."""
    optimizer.zero_grad(set_to_none=True)
    counts = distributed.all_sum({"real": int(real_masked.sum()), "fake": int(fake_masked.sum())})
    fake_logits = discriminator(fake, attention_mask, time=tau, response_mask=response_mask, generator=generator)
    real_logits = discriminator(real, attention_mask, time=tau, response_mask=response_mask, generator=generator)
    d_loss = discriminator_loss(real_logits, real_masked, fake_logits, fake_masked, config.label_smoothing,
                                counts=(counts["real"], counts["fake"]))
    d_loss.backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    sharding.sum_gradients(discriminator, parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.discriminator_max_grad_norm)
    total = distributed.all_sum(d_loss.item())
    if not nonfinite.skip([optimizer], discriminator_loss=total, discriminator_grad_norm=float(grad_norm)):
        optimizer.step()
    return total


def _student_update(student, teacher, optimizer, parameters, sample, reward, response_mask, attention_mask,
                    config: DiDiConfig, nonfinite: NonFiniteLoss, generator, density=None) -> dict:
    """One student step on its rollout `sample`: −mean over rows of ω · Â · log q(x) (log q summed over the tokens),
    plus, for every rollout state, kl_coef · its mean per-token KL(teacher ‖ student) − entropy_coef · its mean
    entropy. `density` is π(τ) of each row's τ (for `tau_importance_weight`). Under data parallelism each mean
    (over rows, and over each state's masked positions) is this rank's sum divided by the global count, and the
    returned metrics are the global ones."""
    length = response_mask.sum(1).clamp(min=1)
    log_q = sample.log_prob()
    reward = reward - config.sequence_entropy_coef * log_q.detach() / length
    if not config.use_discriminator:
        advantage = torch.zeros_like(reward)
    elif config.grouped_normalisation:
        advantage = grouped_advantages(reward, config.group_size, config.advantage_clip)
    else:
        advantage = reward
    omega = time_weight(sample.tau, config.omega_min, config.omega_max) if config.use_time_weight else 1.0
    if config.tau_importance_weight:
        omega = omega / density
    # The positions each state still has masked: the KL and the entropy are measured there.
    masked = [(state == student.mask_token_id) & response_mask for state in sample.states]
    local = {"rows": len(reward), **{f"state{k}": int(m.sum()) for k, m in enumerate(masked)}}
    if config.conditional_kl_coef:
        conditional, local["revealed"] = conditional_kl(sample.logits, teacher, sample, attention_mask,
                                                        config.conditional_folds, generator)
    total = distributed.all_sum(local)
    share = {name: local[name] / total[name] if total[name] else 0.0 for name in local}  # 1 in one process
    policy_loss = -(omega * advantage * log_q).mean() * share["rows"]
    kl = entropy = 0.0
    for k, (state, logits) in enumerate(zip(sample.states, sample.logits)):
        with torch.no_grad():  # with kl_coef 0 the teacher's forward is skipped and the KL not logged
            teacher_logits = teacher(state, attention_mask).logits if config.kl_coef else logits.detach()
        kl_k, entropy_k = kl_and_entropy(logits, teacher_logits, masked[k])
        kl = kl + kl_k * share[f"state{k}"]
        entropy = entropy + entropy_k * share[f"state{k}"]
    loss = policy_loss + config.kl_coef * kl - config.entropy_coef * entropy
    extra = {"kl": kl.item()} if config.kl_coef else {}
    if config.conditional_kl_coef:
        conditional = conditional / max(total["revealed"], 1)
        loss = loss + config.conditional_kl_coef * conditional
        extra["conditional_kl"] = conditional.item()
    line = distributed.all_sum({**extra, "loss": loss.item(), "policy_loss": policy_loss.item(),
                                "entropy": entropy.item(),
                                "rollout_log_prob": float((log_q.detach() / length).mean()) * share["rows"],
                                "advantage_abs": float(advantage.abs().mean()) * share["rows"]})
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sharding.sum_gradients(student, parameters)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    if not nonfinite.skip([optimizer], loss=line["loss"], grad_norm=float(grad_norm)):
        optimizer.step()
    return {**line, "grad_norm": float(grad_norm)}


def _reward_against_validity(final, response_mask, reward, tokenizer, task: str, rows) -> dict:
    """The task's validity of the student's training samples, and its Pearson correlation with the discriminator's
    reward over them: does the reward track what the testbed can check? (This process's rows only.)"""
    from dlm_rl.judge import validities
    from dlm_rl.testbed import TASKS

    responses = final[response_mask].view(len(final), -1).cpu()
    validity = torch.tensor(validities(responses, tokenizer, TASKS[task].generator, rows), dtype=torch.float64)
    paired = torch.stack([reward.double().cpu(), validity])
    correlation = float(torch.corrcoef(paired)[0, 1]) if (paired.std(1) > 0).all() else 0.0
    return {"sample_validity": float(validity.mean()), "reward_validity_correlation": correlation}


@torch.no_grad()
def _evaluate(model, config: DiDiConfig, rows, gen_length: int, device, task: str | None) -> dict:
    """The student's samples at `eval_nfe` ancestral steps: validity (testbed task `task`), entropy, distinct."""
    from dlm_rl.data.collate import encode_prompt, left_pad
    from dlm_rl.judge import sample_quality
    from dlm_rl.sampling.guided import ancestral_sample
    from dlm_rl.testbed import TASKS

    model.eval()
    picked = [rows[i % len(rows)] for i in range(config.eval_samples)]
    generator = torch.Generator(device).manual_seed(config.seed + 1)
    responses = []
    for start in range(0, len(picked), config.eval_batch_size):
        batch = picked[start : start + config.eval_batch_size]
        prompts = [encode_prompt(model.tokenizer, row["prompt"]) for row in batch]
        prompt_ids, prompt_mask = left_pad(prompts, model.tokenizer.pad_token_id)
        samples = ancestral_sample(model, prompt_ids.to(device), prompt_mask.to(device), gen_length, config.eval_nfe,
                                   generator=generator)
        responses.append(samples.response_ids.cpu())
    scorer = TASKS[task].generator if task is not None else None
    quality = sample_quality(torch.cat(responses), model.tokenizer, scorer, picked)
    return {f"eval/{name}": value for name, value in quality.items()}


class DiDiTrainer(RLTrainer):
    """DiDi-Instruct in TRL's shape (`dlm_rl.trainers.api`): `DiDiTrainer(model=TEACHER, args=DiDiConfig(...),
    train_dataset=...).train()`; `model` is the teacher (a name, a path or a DiffusionLM), `train_dataset` rows of
    `prompt` and `completion`, `peft_config` the student's adapter. Rewards come from the discriminator: it takes
    no `reward_funcs`."""

    config_class = DiDiConfig
    run = staticmethod(run)
    model_key = "teacher"
