"""Gymnasium driving environments. Importing this package registers ``alpagym/DriveSim-v0`` and
``alpagym/AlpaSim-v0``
(the one import-time side effect the project allows)."""

from __future__ import annotations


def register_envs() -> None:
    import gymnasium

    if "alpagym/DriveSim-v0" not in gymnasium.registry:
        gymnasium.register(id="alpagym/DriveSim-v0", entry_point="envs.drivesim.gym_env:DriveSimEnv")
    if "alpagym/AlpaSim-v0" not in gymnasium.registry:
        gymnasium.register(id="alpagym/AlpaSim-v0", entry_point="envs.alpasim.env:AlpaSimEnv")


register_envs()
