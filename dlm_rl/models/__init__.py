"""Diffusion LM wrapper, attention masks, loaders."""

from dlm_rl.models.diffusion_lm import Conventions, DiffusionLM
from dlm_rl.models.loading import FAMILIES, from_causal_lm, load
from dlm_rl.models.tiny import tiny_model

__all__ = ["Conventions", "DiffusionLM", "FAMILIES", "from_causal_lm", "load", "tiny_model"]
