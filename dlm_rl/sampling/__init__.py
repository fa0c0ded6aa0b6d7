"""The diffusion sampler (reference, threshold and factor decoding, KV caches) and the trajectories it records."""

from dlm_rl.sampling.config import SamplerConfig
from dlm_rl.sampling.sampler import generate
from dlm_rl.sampling.trajectory import Trajectory

__all__ = ["SamplerConfig", "Trajectory", "generate"]
