"""Generation with validation and retries, shared by the simulation and Best-of-N.

Both run LLM generations whose output is checked by a validator and, when bad, retried with a new
seed up to `max_attempts`: the simulation streams its requests (music_assets/simulation/driver.py),
Best-of-N sends batched calls (`BatchGenerator`). What they share lives here, so Best-of-N does not
depend on the simulation: the results (`Ok`, or a `Failure` with its reason), the `Validator`
signature and the basic checks every output passes (`basic_validator`), the per-attempt seed, and
the counters (`GenerationStats`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Ok:
    text: str
    attempts: int
    tokens: int


@dataclass
class Failure:
    reason: str
    output: str


Validator = Callable[[str, str], tuple[str | None, str]]  # (text, finish) -> (failure reason, cleaned)


@dataclass
class GenerationStats:
    retries: Counter = field(default_factory=Counter)  # reason -> retried generations
    calls: int = 0  # batched calls (Best-of-N), or rounds of finished generations from a stream (simulation)
    requests: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0


class BatchGenerator:
    """Batched generation with validation and retries (used by Best-of-N; the simulation streams its
    requests instead, see music_assets/simulation/driver.py)."""

    def __init__(self, max_attempts: int, stats: GenerationStats):
        self.max_attempts, self.stats = max_attempts, stats

    def run(self, engine, conversations, sampling, seeds, validators) -> list[Ok | Failure]:
        """Generates for all conversations in one batched call, then retries the failures (again
        batched) with new seeds, up to `max_attempts` in all."""
        results: list[Ok | Failure | None] = [None] * len(conversations)
        pending = list(range(len(conversations)))
        tokens = [0] * len(conversations)
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            started = time.perf_counter()
            outs = engine.chat([conversations[i] for i in pending], sampling,
                               [attempt_seed(seeds[i], attempt) for i in pending])
            self.stats.generation_seconds += time.perf_counter() - started
            self.stats.calls += 1
            self.stats.requests += len(pending)
            still = []
            for i, out in zip(pending, outs):
                self.stats.completion_tokens += out.completion_tokens
                tokens[i] += out.completion_tokens
                results[i] = validated(validators[i], out, attempt, tokens[i])
                if isinstance(results[i], Failure) and attempt < self.max_attempts:
                    self.stats.retries[results[i].reason] += 1
                    still.append(i)
            pending = still
        return results


def attempt_seed(seed: int, attempt: int) -> int:
    """A new seed per attempt, so a retry samples differently (and reproducibly)."""
    return (seed + 7919 * (attempt - 1)) % 2**31


def validated(validator: Validator, out, attempt: int, tokens: int) -> Ok | Failure:
    reason, cleaned = validator(out.text, out.finish_reasons[0])
    return Ok(cleaned, attempt, tokens) if reason is None else Failure(reason, out.error or out.text)


_TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def basic_validator(text: str, finish: str) -> tuple[str | None, str]:
    if finish == "error":  # the engine refused the request (e.g. the prompt outgrew the context)
        return "engine_rejected", text
    if finish == "length":
        return "truncated", text
    cleaned = text.strip()
    if any(marker in cleaned for marker in _TEMPLATE_MARKERS):
        return "template_markers_in_output", cleaned
    if not cleaned:
        return "empty", cleaned
    return None, cleaned
