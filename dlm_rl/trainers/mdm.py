"""Masked-diffusion SFT / pretraining on the transformers `Trainer` (LLaDA §2.3, MDLM).

Loss per batch: −E_draw[ w · Σ_i 1[x_t^i = M] log p_θ(x_0^i | x_t) ] / L, the prompt never masked, with
w = L/ℓ (tokens form, default: lower variance) or w(t) (time form). Optional complementary masks (LaViDa) add,
for every draw, its complement, so each response token is trained once per pair. A block-attention model trains
on its block-diffusion ELBO (`dlm_rl.diffusion.elbo`): every response block noised on its own, given the clean
earlier blocks.

The loss, its defaults and LLaDA's values: docs/algorithms.md, section 1.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import set_seed
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dlm_rl.checkpoint import good_checkpoint, refuse_earlier_run, resume_setting, write_manifest
from dlm_rl.data.collate import DiffusionCollator, require_columns
from dlm_rl.data.sources import as_dataset, completion_rows, rename_task
from dlm_rl.diffusion import MCNoise, mdm_loss
from dlm_rl.diffusion.elbo import elbo_blocks
from dlm_rl.diffusion.noise import FORMS
from dlm_rl.diffusion.schedules import SCHEDULES
from dlm_rl.guards import NonFiniteArguments, NonFiniteLoss
from dlm_rl.models.lora import LoraArguments
from dlm_rl.trainers.online import require_positive

logger = logging.getLogger(__name__)


@dataclass
class MDMConfig(LoraArguments, NonFiniteArguments, TrainingArguments):
    """Masked-diffusion SFT: TrainingArguments plus the model, data and noise settings."""

    model: str = "tiny"
    """'tiny' (a fresh tiny Llama with the char tokenizer), 'smollm2' (offline A2D), or a path saved by dlm-rl."""
    tiny_hidden_size: int = 128
    """Tiny model width (model: tiny)."""
    tiny_num_layers: int = 4
    """Tiny model depth (model: tiny)."""
    attention: str = "full"
    """Attention of a new model: 'full' or 'block'."""
    block_size: int | None = None
    """Block length for attention: block."""
    trust_remote_code: bool = False
    """Allow a LLaDA/Dream/SDAR checkpoint's own modelling code."""
    dataset_name: str | None = None
    """A testbed task (see dlm_rl.testbed.TASKS), or a hub dataset with `prompt` and `completion` (or
    conversational `messages`) rows; or None to use dataset_path."""
    dataset_config: str | None = None
    """The hub dataset's configuration."""
    dataset_train_split: str = "train"
    """The split to train on (a hub dataset, or a directory written by save_to_disk)."""
    task: str | None = None
    """Deprecated: dataset_name (the same values)."""
    dataset_path: str | None = None
    """A local json/jsonl/parquet/csv file or saved dataset directory with 'prompt' and 'completion' (or
    'messages') columns."""
    train_size: int = 20000
    """Number of training problems drawn from a testbed task."""
    response_length: int | None = None
    """Response canvas (completion + EOS padding); a testbed task supplies its own."""
    noise_form: str = "tokens"
    """ELBO form: 'tokens' (mask exactly ℓ ~ U{1..L}, weight L/ℓ) or 'time' (t ~ U(t_min, 1), weight w(t))."""
    noise_schedule: str = "linear"
    """Schedule of the time form: linear, cosine, log-linear."""
    t_min: float = 1e-3
    """Smallest t of the time form."""
    complementary_masks: bool = False
    """Also train on each draw's complementary mask."""
    resume: str | None = None
    """Continue from a checkpoint the Trainer saved (save_steps): its directory, or 'latest' (or true) for the
    newest whole one in output_dir (checked against its manifest). The same as the Trainer's
    `resume_from_checkpoint`."""
    remove_unused_columns: bool = False  # the collator needs the raw text columns
    report_to: str | list[str] = field(default="none")

    def __post_init__(self):
        if self.noise_form not in FORMS:
            raise ValueError(f"noise_form must be one of {FORMS}, got {self.noise_form!r}")
        if self.noise_schedule not in SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {SCHEDULES}, got {self.noise_schedule!r}")
        rename_task(self)
        if self.dataset_name is not None and self.dataset_path is not None:
            raise ValueError("set exactly one of dataset_name (a testbed task) and dataset_path")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of steps, or -1 to train num_train_epochs epochs; "
                             f"got {self.max_steps}")
        require_positive(self, "train_size", "response_length", "tiny_hidden_size", "tiny_num_layers")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must not be negative, got {self.learning_rate}")
        if not 0 < self.t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")
        if self.dataset_path is not None:
            from dlm_rl.data.files import refuse_empty_file

            refuse_empty_file(self.dataset_path, "dataset_path")
        self.resume = resume_setting(self.resume or self.resume_from_checkpoint)
        if self.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported: MDM SFT runs no evaluation to pick a best model")
        if self.data_seed is None:  # the data order must not follow the global seed, which differs between ranks
            self.data_seed = self.seed
        if self.report_to in (None, [None]):  # a recipe's parser leaves the unset list field None, not our default
            self.report_to = "none"
        super().__post_init__()


class MDMTrainer(Trainer):
    """transformers Trainer whose loss is the masked-diffusion loss of a DiffusionLM, in TRL's shape:
    `MDMTrainer(model, args=MDMConfig(...), train_dataset=rows).train()`. `model` is a DiffusionLM, or a name or
    path as the `model` key takes it (then built with `args`' LoRA settings); `train_dataset` has `prompt` and
    `completion` columns; `response_length` defaults to `args.response_length`; `peft_config` (a
    `peft.LoraConfig`) adds an adapter; other keyword arguments go to transformers' Trainer (`callbacks`, ...)."""

    def __init__(self, model, args: MDMConfig, train_dataset, response_length: int | None = None, peft_config=None,
                 **kwargs):
        if isinstance(model, str):
            model = build_model(args, model)
        if peft_config is not None:
            from dlm_rl.models.lora import add_lora, lora_arguments

            add_lora(model, lora_arguments(peft_config))
        response_length = response_length or args.response_length
        if response_length is None:
            raise ValueError("MDMTrainer needs response_length (completion + EOS tokens), or args.response_length")
        train_dataset = as_dataset(train_dataset, "train_dataset")
        require_columns(train_dataset, ["prompt", "completion"], "MDMTrainer")
        collator = DiffusionCollator(model.tokenizer, response_length)
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=collator, **kwargs)
        if args.world_size > 1:  # the Trainer seeded every rank alike: each would draw the same masks
            set_seed(args.seed, device_specific=True)
        self.nonfinite = NonFiniteLoss(args.max_nonfinite_steps, "MDM")
        if not args.fp16:  # fp16's loss scaler skips overflowing steps itself (and fails on a step without grads)
            self.add_callback(SkipNonFinite(self.nonfinite))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        response_mask = inputs["response_mask"]
        noise = MCNoise.sample(
            response_mask, form=self.args.noise_form, schedule=self.args.noise_schedule, t_min=self.args.t_min,
            blocks=elbo_blocks(model, inputs["attention_mask"]),
        )
        if self.args.complementary_masks:
            other = noise.complement(response_mask)
            noise = MCNoise(
                torch.cat([noise.masked, other.masked]),
                torch.cat([noise.weight, other.weight]),
                torch.cat([noise.t, other.t]),
                noise.form,
                noise.schedule,
            )
        loss = mdm_loss(model, inputs["input_ids"], response_mask, noise, inputs["attention_mask"])
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the count of skipped non-finite steps next to the training loss."""
        if "loss" in logs:
            logs["guard/nonfinite_steps"] = self.nonfinite.count
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's loading, into the wrapped transformers model: a checkpoint holds its weights or adapter
        under its own names (`_save`). FSDP passes its wrapped model, whose checkpoint is the wrapper's own. A LoRA
        checkpoint must have this run's adapter structure (PEFT would load a misfit in part, silently)."""
        if model is None:
            model = self.model.model
            if hasattr(model, "peft_config"):
                _refuse_another_adapter(model, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _issue_warnings_after_load(self, load_result) -> None:
        """Refuse a checkpoint whose weights do not match the model's names (the Trainer only warns), counting the
        tied weights a save leaves out as present."""
        tied = set(getattr(self.model.model, "all_tied_weights_keys", None) or ())
        missing = [name for name in load_result.missing_keys if name not in tied]
        if missing or load_result.unexpected_keys:
            raise ValueError(f"the checkpoint does not fit the model: missing {missing}, unexpected "
                             f"{load_result.unexpected_keys}; resume with the model it was saved with")

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then its manifest (`write_manifest`), once every process has written its
        files (each its own RNG state)."""
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_manifest(os.path.join(self._get_output_dir(trial=trial), folder))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the DiffusionLM (weights or adapter, tokenizer, conventions) so `dlm_rl.models.load` reads it. The
        Trainer's `save_model` calls this in the writing process, with the state dict it gathered when the weights
        are sharded (FSDP, DeepSpeed ZeRO-3), with the DiffusionLM's names."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def _refuse_another_adapter(model, checkpoint: str) -> None:
    """A LoRA checkpoint saved with another rank, alpha or set of target modules cannot be resumed."""
    path = os.path.join(checkpoint, "adapter_config.json")
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {checkpoint} holds no LoRA adapter (no adapter_config.json), but this run trains "
                         "one; resume with the LoRA settings it was saved with")
    with open(path) as f:
        saved = json.load(f)
    current = model.peft_config[model.active_adapter]

    def modules(targets) -> list:  # a list of module names, or one regular expression
        return [targets] if isinstance(targets, str) else sorted(targets or [])

    settings = {"r": current.r, "lora_alpha": current.lora_alpha, "target_modules": modules(current.target_modules)}
    saved = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
             "target_modules": modules(saved.get("target_modules"))}
    if saved != settings:
        raise ValueError(f"checkpoint {checkpoint} was saved with another LoRA adapter ({saved}, this run: {settings});"
                         " resume with the LoRA settings it was saved with")


class SkipNonFinite(TrainerCallback):
    """Skips an optimiser step whose gradients are NaN or inf (a NaN/inf loss makes them so; the Trainer logs such
    losses filtered and would step on them) and stops the run at the `max_nonfinite_steps`-th."""

    def __init__(self, guard: NonFiniteLoss):
        self.guard = guard

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
        norm = torch.stack(norms).norm() if norms else torch.zeros(())  # torch.nn.utils.get_total_norm needs 2.6
        self.guard.skip([optimizer], grad_norm=float(norm))


def build_model(config: MDMConfig, spec: str):
    """The model `spec` names, built as `config` says (a new model's size and attention, trust_remote_code), with
    its LoRA adapter when `config.use_lora`."""
    from dlm_rl.models.lora import add_lora
    from dlm_rl.model_spec import resolve_model

    model = resolve_model(spec, attention=config.attention, block_size=config.block_size,
                          trust_remote_code=config.trust_remote_code, tiny_hidden_size=config.tiny_hidden_size,
                          tiny_num_layers=config.tiny_num_layers, seed=config.seed)
    if config.use_lora:
        add_lora(model, config)
    return model


def run(config: MDMConfig) -> str:
    """Train as the config says and save the result to config.output_dir; returns that path."""
    from dlm_rl.model_spec import known_tokenizer

    if config.dataset_name is None and config.dataset_path is None:
        raise ValueError("set exactly one of dataset_name (a testbed task) and dataset_path")
    if config.resume is None:
        refuse_earlier_run(config.output_dir)
    resume = config.resume and good_checkpoint(config.resume, config.output_dir, marker=TRAINER_STATE_NAME)
    train, response_length = completion_rows(config.dataset_name, config.dataset_path, config.train_size,
                                             config.seed, config.response_length, known_tokenizer(config.model),
                                             config.dataset_config, config.dataset_train_split)
    trainer = MDMTrainer(build_model(config, config.model), config, train, response_length)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    logger.info("saved the trained model to %s", config.output_dir)
    return config.output_dir
