"""The simulation stage's settings (YAML section `simulation:`): which seed contexts are
continued, and how the chosen and rejected branches are simulated. `seed_contexts`,
`simulated_branches` and `music_pairs` read this one object; so does `simulate()`. Best-of-N and
the judge take their prompt templates from here too (`prompts_dir`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from music_assets.common.config import setting
from music_assets.common.engines import Sampling
from music_assets.simulation.prompts import Prompts, load_prompts


ON_LENGTH = ("retry", "trim", "continue")


@dataclass(frozen=True)
class SimulationConfig:
    # seed contexts: the first k user/assistant exchanges of a seed conversation
    min_context_exchanges: int = setting(1, help="fewest seed exchanges a context keeps (k is drawn per conversation)")
    max_context_exchanges: int = setting(3, help="most seed exchanges a context keeps (capped by the conversation)")
    max_contexts: int | None = setting(
        None, help="contexts per seed partition, a sample seeded by `seed` (stable as the seeds grow); None: every pair")
    seed: int = setting(0, help="seeds k, the contrast turn c and every sampling request")
    # the simulation
    turns: int = setting(3, help="T: simulated turns after the seed context (paper: 5)")
    contrast_turn: int | None = setting(
        None, help="fixed contrast turn c (1-based); None: drawn per context from [1, T - min_contrast_turns + 1]")
    min_contrast_turns: int = setting(2, help="the rejected branch is flawed in at least this many turns")
    max_attempts: int = setting(3, help="tries per generation (the first included) before a context is dropped")
    # Measured on the demo (SmolLM2-135M, 8 contexts, T=2): trim finished 8 of 8 contexts at 880
    # generated tokens per MUSIC pair, continue 5 of 8 at 2,501 (SmolLM2's cut answers loop, and a
    # loop continued is still cut), retry 5 of 8 before this setting existed.
    on_length: str = setting(
        "trim", help="a user or assistant message cut at max_tokens: trim (keep it up to its last complete sentence; "
                     "the row says 'trimmed'), retry (sample it anew), or continue (the engine goes on writing the "
                     "same message, up to max_continuations times, then it is retried)")
    max_continuations: int = setting(
        2, help="with on_length: continue, how many times a cut message is continued (a message is then at most "
                "(1 + max_continuations) x max_tokens long)")
    rewrite_context_chars: int = setting(
        1500, help="the rewriter reads the conversation before the turn-c request, its latest messages up to this "
                   "many characters, so a follow-up ('make it shorter') is rewritten in context; 0: the request alone")
    user_sampling: Sampling = setting(
        factory=lambda: Sampling(temperature=0.8, max_tokens=96), help="the user simulator's sampling")
    assistant_sampling: Sampling = setting(
        factory=lambda: Sampling(temperature=0.7, max_tokens=256), help="the assistant's sampling (both branches)")
    rewrite_sampling: Sampling = setting(
        factory=lambda: Sampling(temperature=0.8, max_tokens=128), help="the rewriter's sampling (modified request)")
    prompts_dir: str | None = setting(
        None, path=True, help="a folder of edited prompt templates (same file names) that replace the packaged ones "
                              "file by file; also used by Best-of-N's user simulator and the judge")

    def __post_init__(self):
        if not 1 <= self.min_context_exchanges <= self.max_context_exchanges:
            raise ValueError("simulation: need 1 <= min_context_exchanges <= max_context_exchanges")
        if self.max_contexts is not None and self.max_contexts < 1:
            raise ValueError(f"simulation.max_contexts must be >= 1 or null for every pair (got {self.max_contexts})")
        if self.turns < 1:
            raise ValueError("simulation.turns must be >= 1")
        if self.max_attempts < 1:
            raise ValueError(f"simulation.max_attempts must be >= 1 (got {self.max_attempts})")
        if self.on_length not in ON_LENGTH:
            raise ValueError(f"simulation.on_length must be one of {', '.join(ON_LENGTH)} (got {self.on_length!r})")
        if self.max_continuations < 0:
            raise ValueError(f"simulation.max_continuations must be >= 0 (got {self.max_continuations})")
        if self.rewrite_context_chars < 0:
            raise ValueError(f"simulation.rewrite_context_chars must be >= 0 (got {self.rewrite_context_chars})")
        if not 1 <= self.min_contrast_turns <= self.turns:
            raise ValueError("simulation.min_contrast_turns must be between 1 and turns")
        if self.contrast_turn is not None and not 1 <= self.contrast_turn <= self.turns - self.min_contrast_turns + 1:
            raise ValueError(
                f"simulation.contrast_turn={self.contrast_turn} leaves fewer than "
                f"{self.min_contrast_turns} flawed turns out of {self.turns}"
            )
        for name in ("user_sampling", "assistant_sampling", "rewrite_sampling"):
            if getattr(self, name).n != 1:
                raise ValueError(f"simulation.{name}.n must be 1: each simulated message is one sample")

    def contrast_turn_for(self, context_id: str) -> int:
        """c for one context: fixed, or drawn from [1, T - min_contrast_turns + 1], seeded."""
        if self.contrast_turn is not None:
            return self.contrast_turn
        rng = random.Random(f"{self.seed}:contrast:{context_id}")
        return rng.randint(1, self.turns - self.min_contrast_turns + 1)

    def min_differing_turns(self) -> int:
        """The fewest assistant turns, from c on, in which a finished pair's rejected answers must
        differ from the chosen ones (music_pairs' blocking check). The rejected branch answers the
        modified request in every turn from c to T, and c is at most T - min_contrast_turns + 1
        (drawn or fixed), so every pair has at least `min_contrast_turns` flawed turns (capped by
        T, though validation already keeps it there). Not T - c + 1 per pair: the check holds every
        pair to what the settings promise, no more."""
        return min(self.min_contrast_turns, self.turns)

    def prompts(self) -> Prompts:
        """The prompt templates: the packaged ones, each replaced by its copy in `prompts_dir` if any."""
        return load_prompts(self.prompts_dir)

    def generation_settings(self) -> dict:
        """The settings that determine generated text (part of the generation key): the context
        selection fields are not among them, so choosing more contexts reuses committed turns."""
        return {
            "turns": self.turns,
            "contrast_turn": self.contrast_turn,
            "min_contrast_turns": self.min_contrast_turns,
            "seed": self.seed,
            "max_attempts": self.max_attempts,
            "on_length": self.on_length,
            "max_continuations": self.max_continuations if self.on_length == "continue" else 0,
            "rewrite_context_chars": self.rewrite_context_chars,
            "user_sampling": self.user_sampling.as_dict(),
            "assistant_sampling": self.assistant_sampling.as_dict(),
            "rewrite_sampling": self.rewrite_sampling.as_dict(),
        }
