"""Published dLLM checkpoints run on transformers' own model classes (no remote code).

Each family maps a hub checkpoint's `config.json` to a native config, renames its tensors if they differ, and names
the diffusion conventions (mask id, logit shift, attention) the checkpoint was trained with. Keyed by the config's
`model_type`, lower-cased. LLaDA2 has no transformers class: dlm-rl's own (`llada2.py`) is registered with the Auto
classes.
"""

from __future__ import annotations

from dlm_rl.models.families.base import Family
from dlm_rl.models.families.dream import DREAM
from dlm_rl.models.families.llada import LLADA
from dlm_rl.models.families.llada2 import LLADA2, register
from dlm_rl.models.families.sdar import SDAR

FAMILIES: dict[str, Family] = {family.model_type: family for family in (LLADA, DREAM, SDAR, LLADA2)}

register()  # saved dlm-rl directories of LLaDA2 load through AutoModelForCausalLM

__all__ = ["FAMILIES", "Family"]
