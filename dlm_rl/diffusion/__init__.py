"""Masked-diffusion core: schedules, forward masking, Monte Carlo noise, ELBO and MDM loss."""

from dlm_rl.diffusion.elbo import elbo, mdm_loss, noised_log_probs
from dlm_rl.diffusion.masking import apply_mask
from dlm_rl.diffusion.noise import MCNoise
from dlm_rl.diffusion.schedules import SCHEDULES, get_schedule

__all__ = ["MCNoise", "SCHEDULES", "apply_mask", "elbo", "get_schedule", "mdm_loss", "noised_log_probs"]
