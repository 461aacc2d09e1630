"""Settings of the evaluation beyond pairwise accuracy (YAML section `evaluation:`): multi-turn
Best-of-N with a judge, and judge agreement. The policy and judge models are engine roles
(`models: {policy: ..., judge: ...}`), so they can be any vLLM model or OpenAI-compatible server."""

from __future__ import annotations


from dagster import ConfigurableResource

from music_assets.evaluation.best_of_n import BestOfNSettings
from resources.simulation_config import SamplingConfig


class EvaluationConfig(ConfigurableResource):
    best_of_n: list[int] = [2, 4, 8]  # N values (paper: 2, 4, 8)
    turns: int = 3  # assistant turns per Best-of-N conversation (paper: 3)
    # contexts per source: held-out seed test conversations, and every prompt-only evaluation set
    # (MT-Bench: 80); None takes them all. Chosen by a seeded hash, so runs are comparable.
    contexts_per_source: int | None = None
    seed: int = 0
    max_attempts: int = 3
    policy_sampling: SamplingConfig = SamplingConfig(temperature=0.8, max_tokens=256)
    user_sampling: SamplingConfig = SamplingConfig(temperature=0.8, max_tokens=96)
    judge_sampling: SamplingConfig = SamplingConfig(temperature=0.0, top_p=1.0, max_tokens=256)
    bootstrap_samples: int = 2000
    agreement_pairs: int = 64  # judged pairs per evaluation set for judge agreement

    def settings(self) -> BestOfNSettings:
        return BestOfNSettings(ns=tuple(self.best_of_n), turns=self.turns, seed=self.seed,
                               max_attempts=self.max_attempts, policy_sampling=self.policy_sampling.to_sampling(),
                               user_sampling=self.user_sampling.to_sampling(),
                               judge_sampling=self.judge_sampling.to_sampling())
