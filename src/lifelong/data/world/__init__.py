"""The world simulator (docs/world.md): a seeded, configurable world with ground-truth probabilities.

Example::

    from lifelong.data.world import load_config, simulate, simulate_to, write_world

    cfg = load_config(preset="tiny", overrides=["seed=3"])
    write_world(simulate(cfg), "worlds/tiny")          # in memory, then written
    simulate_to(load_config("lifelong"), "worlds/ll")  # streamed block by block
"""

from lifelong.data.world.config import PRESETS, WorldConfig, load_config
from lifelong.data.world.simulate import World, simulate, simulate_to, write_world

__all__ = ["PRESETS", "World", "WorldConfig", "load_config", "simulate", "simulate_to", "write_world"]
