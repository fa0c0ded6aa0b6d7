"""The trainers' Python API, in TRL's shape:

    trainer = TraceRLTrainer(model="testbed:addition3-base", args=TraceRLConfig(max_steps=50),
                             train_dataset=dataset, reward_funcs=[my_reward])
    metrics = trainer.train()

`model` is a model name or path as a recipe takes it, or a loaded `DiffusionLM`; `args` the trainer's config (the
recipe keys); `train_dataset` / `eval_dataset` a `datasets.Dataset` or a list of row dicts, in place of the config's
dataset keys; `reward_funcs` callables or 'module:function' references, in place of `args.reward_funcs`;
`peft_config` a `peft.LoraConfig`, in place of the config's LoRA keys; `callbacks` transformers `TrainerCallback`s.
The command line builds the same objects (`dlm-rl train RECIPE`).

Callbacks get transformers' events with the trainer's config as `args`, a `TrainerState` (global_step, max_steps,
log_history) and a `TrainerControl`: `on_train_begin`, `on_step_end`, `on_log` (`logs`: the step's metrics line),
`on_evaluate` (`metrics`: the held-out ones), `on_save`, `on_train_end`. Setting `control.should_training_stop`
ends the run after that step, with its final model written as at the last step. They run in the main process.
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerControl, TrainerState

from dlm_rl import distributed
from dlm_rl.models.lora import lora_arguments


class Callbacks:
    """The run's callbacks and the state and control they share."""

    def __init__(self, callbacks, args, done: int):
        self.callbacks, self.args = list(callbacks or []), args
        self.state = TrainerState(global_step=done, max_steps=args.max_steps, is_world_process_zero=True)
        self.control = TrainerControl()

    def event(self, name: str, **kwargs) -> None:
        if not distributed.is_main():
            return
        for callback in self.callbacks:
            method = getattr(callback, name, None)
            if method is not None:
                method(self.args, self.state, self.control, **kwargs)

    def step_end(self, line: dict) -> bool:
        """The step's events (`line`: its metrics); whether a callback asked to stop (on every rank alike)."""
        self.state.global_step = line["step"]
        if distributed.is_main():
            self.state.log_history.append(line)
            evaluated = {name: value for name, value in line.items() if name.startswith("eval/")}
            if evaluated:
                self.event("on_evaluate", metrics=evaluated)
            self.event("on_log", logs=line)
            self.event("on_step_end")
        return bool(distributed.all_sum(int(self.control.should_training_stop)))


class RLTrainer:
    """What `TraceRLTrainer`, `VRPOTrainer` and `DiDiTrainer` share: turning TRL-style arguments into the config
    and the objects their `run` takes."""

    config_class: type
    run: staticmethod
    model_key = "model"
    """The config key `model` replaces (DiDi: its teacher)."""

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, reward_funcs=None,
                 peft_config=None, callbacks=None):
        args = args if args is not None else self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} takes args={self.config_class.__name__}(...), got "
                            f"{type(args).__name__}")
        changes = {}
        if isinstance(model, str):
            changes[self.model_key], model = model, None
        elif model is not None and getattr(args, "rollout_actors", 0):
            raise ValueError("rollout_actors build their own policy from args.model: pass the model by name")
        if reward_funcs is not None:
            if not hasattr(args, "reward_funcs"):
                raise ValueError(f"{type(self).__name__} takes no reward_funcs")
            changes["reward_funcs"] = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if peft_config is not None:
            changes.update(dataclasses.asdict(lora_arguments(peft_config)))
        self.args = dataclasses.replace(args, **changes) if changes else args
        self.model, self.train_dataset, self.eval_dataset = model, train_dataset, eval_dataset
        self.callbacks = list(callbacks or [])

    def train(self) -> dict:
        """Train; returns the last metrics line (also the last line of metrics.jsonl)."""
        return type(self).run(self.args, model=self.model, train_dataset=self.train_dataset,
                              eval_dataset=self.eval_dataset, callbacks=self.callbacks)
