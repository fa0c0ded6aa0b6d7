"""dlm-rl: reinforcement-learning post-training for masked diffusion language models.

The trainers and their configs import from here, as TRL's do (`from dlm_rl import TraceRLTrainer, TraceRLConfig`);
they load on first use, so `import dlm_rl` stays light."""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "TraceRLTrainer": "dlm_rl.trainers.tracerl",
    "TraceRLConfig": "dlm_rl.trainers.tracerl",
    "VRPOTrainer": "dlm_rl.trainers.vrpo",
    "VRPOConfig": "dlm_rl.trainers.vrpo",
    "DiDiTrainer": "dlm_rl.trainers.didi",
    "DiDiConfig": "dlm_rl.trainers.didi",
    "MDMTrainer": "dlm_rl.trainers.mdm",
    "MDMConfig": "dlm_rl.trainers.mdm",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dlm_rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
