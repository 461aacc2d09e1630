"""Settings of the MUSIC simulation, as a resource so that the YAML config (section `simulation:`)
sets them in one place for the demo, the UI and schedules alike."""

from __future__ import annotations


from dagster import Config, ConfigurableResource

from music_assets.common.engines import Sampling
from music_assets.simulation.simulate import SimulationSettings


class SamplingConfig(Config):
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256

    def to_sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)


class SimulationConfig(ConfigurableResource):
    # seed contexts: the first k user/assistant exchanges of a seed conversation, k drawn per
    # conversation from [min_context_exchanges, max_context_exchanges] (capped by its length)
    min_context_exchanges: int = 1
    max_context_exchanges: int = 3
    max_contexts: int | None = None  # per seed partition; None: every pair
    seed: int = 0
    # simulation
    turns: int = 3  # T (paper: 5)
    contrast_turn: int | None = None  # fixed c, or None: sampled in [1, T - min_contrast_turns + 1]
    min_contrast_turns: int = 2
    max_attempts: int = 3
    user_sampling: SamplingConfig = SamplingConfig(temperature=0.8, max_tokens=96)
    assistant_sampling: SamplingConfig = SamplingConfig(temperature=0.7, max_tokens=256)
    rewrite_sampling: SamplingConfig = SamplingConfig(temperature=0.8, max_tokens=128)

    def settings(self) -> SimulationSettings:
        return SimulationSettings(
            turns=self.turns,
            contrast_turn=self.contrast_turn,
            min_contrast_turns=self.min_contrast_turns,
            seed=self.seed,
            max_attempts=self.max_attempts,
            user_sampling=self.user_sampling.to_sampling(),
            assistant_sampling=self.assistant_sampling.to_sampling(),
            rewrite_sampling=self.rewrite_sampling.to_sampling(),
        )
