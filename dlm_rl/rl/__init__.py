"""Pieces the RL trainers share: trajectories turned into training rows, advantages, and the policy losses."""
