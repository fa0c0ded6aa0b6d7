"""dlm-rl: reinforcement-learning post-training for masked diffusion language models."""

__version__ = "0.1.0"
