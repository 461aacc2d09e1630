"""Generation with validation and retries, shared by the simulation and Best-of-N.

Both run LLM generations whose output is checked by a validator and, when bad, retried with a new
seed up to `max_attempts`: the simulation streams its requests (music_assets/simulation/driver.py),
Best-of-N sends batched calls (`BatchGenerator`). What they share lives here, so Best-of-N does not
depend on the simulation: the results (`Ok`, or a `Failure` with its reason), the `Validator`
signature and the basic checks every output passes (`basic_validator`), the per-attempt seed, and
the counters (`GenerationStats`).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Ok:
    text: str
    attempts: int
    tokens: int
    finish: str = "stop"  # 'stop'; 'trimmed' (cut at max_tokens, cut back to a sentence); 'continued'


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
    continuations: int = 0  # requests that continued a cut message (`on_length: continue`)
    trimmed: int = 0  # outputs cut at max_tokens and kept up to their last complete sentence (`trim`)

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


def validated(validator: Validator, out, attempt: int, tokens: int, on_length: str = "retry",
              text: str | None = None, continued: bool = False) -> Ok | Failure:
    """The validator's verdict on one output. `text`: the whole message when it was written in
    several requests (`continue`), else the output's own. An output cut at max_tokens fails as
    'truncated' (and is retried), unless `on_length` is 'trim' and it has a complete sentence to
    keep (see `trim_to_sentence`)."""
    text = out.text if text is None else text
    finish, label = out.finish_reasons[0], "continued" if continued else "stop"
    if finish == "length" and on_length == "trim" and (kept := trim_to_sentence(text)):
        text, finish, label = kept, "stop", "trimmed"
    reason, cleaned = validator(text, finish)
    return Ok(cleaned, attempt, tokens, label) if reason is None else Failure(reason, out.error or text)


# A sentence ends with . ! ? or … (closing quotes or brackets may follow) before a space or the
# end; not after a digit or alone ("1." opens a list item, it does not end a sentence).
_SENTENCE_END = re.compile(r"(?<=[^\d\s])[.!?…][\"'”’)\]]*(?=\s|$)")
MIN_TRIMMED_SHARE = 1 / 3  # cutting more than two thirds of an answer away leaves a different answer


def trim_to_sentence(text: str) -> str | None:
    """`text` cut at max_tokens, cut back to its last complete sentence outside a code block; None
    when that would keep less than a third of it (then the output is retried instead)."""
    for end in reversed([m.end() for m in _SENTENCE_END.finditer(text)]):
        kept = text[:end].rstrip()
        if len(kept) < MIN_TRIMMED_SHARE * len(text.rstrip()):
            return None
        if kept.count("```") % 2 == 0:
            return kept
    return None


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
