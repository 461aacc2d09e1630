"""The evaluation stage's settings beyond pairwise accuracy (YAML section `evaluation:`):
multi-turn Best-of-N with a judge, judge agreement and the report's bootstrap. The policy and
judge models are engine roles (`models: {policy: ..., judge: ...}`), so they can be any vLLM
model or OpenAI-compatible server. `best_of_n`, `judge_agreement` and `evaluation_report` read
this one object; so does `run_best_of_n()`."""

from __future__ import annotations

from dataclasses import dataclass

from music_assets.common.config import setting
from music_assets.common.engines import Sampling


@dataclass(frozen=True)
class EvaluationConfig:
    best_of_n: list[int] = setting(factory=lambda: [2, 4, 8], help="the N values of Best-of-N (paper: 2, 4, 8)")
    turns: int = setting(3, help="assistant turns per Best-of-N conversation (paper: 3)")
    contexts_per_source: int | None = setting(
        None, help="Best-of-N contexts per source (held-out seed test conversations, each prompt-only evaluation "
                   "set); chosen by a seeded hash so runs are comparable; None: all")
    # Here rather than on the evaluation set: it is a Best-of-N setting like the one above, drawn with the same
    # `seed`, and it can also size (or, with 0, turn off) the held-out seed contexts, which are no evaluation set.
    max_contexts: dict[str, int] = setting(
        factory=dict, help="Best-of-N contexts for a named source (an evaluation set's name or 'heldout_seed'), over "
                           "contexts_per_source; the paper: {hh: 1000, ultrainteract: 1000, heldout_seed: 0}")
    seed: int = setting(0, help="seeds context sampling, every generation and the bootstrap")
    max_attempts: int = setting(3, help="tries per user message or candidate set, the first included")
    policy_sampling: Sampling = setting(
        factory=lambda: Sampling(temperature=0.8, max_tokens=256), help="the policy's sampling of the N candidates")
    user_sampling: Sampling = setting(
        factory=lambda: Sampling(temperature=0.8, max_tokens=96), help="the user simulator's sampling")
    # The judge prompt asks for a few sentences of comparison, then the verdict: the answer must hold both, and
    # one cut before its verdict is a judge error (judge_truncated). The judge's context is sized for its
    # longest prompt plus this many tokens.
    judge_sampling: Sampling = setting(
        factory=lambda: Sampling(temperature=0.0, top_p=1.0, max_tokens=512),
        help="the judge's sampling; max_tokens must hold its explanation and the verdict after it (an answer cut "
             "before the verdict is a judge error, not a tie)")
    bootstrap_samples: int = setting(2000, help="bootstrap resamples for the win-rate intervals")
    agreement_pairs: int = setting(64, help="judged pairs per evaluation set for judge agreement")

    def __post_init__(self):
        if not self.best_of_n or any(n < 1 for n in self.best_of_n):
            raise ValueError(f"evaluation.best_of_n: every N must be >= 1, got {list(self.best_of_n)}")
        if any(limit < 0 for limit in self.max_contexts.values()):
            raise ValueError(f"evaluation.max_contexts: every limit must be >= 0, got {dict(self.max_contexts)}")
        if self.turns < 1:
            raise ValueError("evaluation.turns must be >= 1")
        for name in ("policy_sampling", "user_sampling", "judge_sampling"):
            if getattr(self, name).n != 1:
                raise ValueError(f"evaluation.{name}.n must be 1 (Best-of-N sets n per N)")

    def run_settings(self) -> dict:
        """The settings that determine a Best-of-N run's output (part of its run key)."""
        return {"ns": list(self.best_of_n), "turns": self.turns, "seed": self.seed, "max_attempts": self.max_attempts,
                **{k: getattr(self, k).as_dict() for k in ("policy_sampling", "user_sampling", "judge_sampling")}}
