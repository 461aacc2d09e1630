"""Seed contexts: the prefixes of seed conversations that the simulation continues, and which
seed pairs get one."""

from __future__ import annotations

import random

from music_assets.common.hashing import seeded_sample, stable_hash


def exchanges(messages: list[dict]) -> int:
    """Complete user/assistant exchanges in a conversation (a leading system message aside)."""
    return sum(1 for m in messages if m["role"] == "assistant")


def sample_context(pair: dict, min_k: int, max_k: int, seed: int) -> dict | None:
    """The first k exchanges of the pair's chosen conversation, k drawn (seeded per pair) from
    [min_k, min(max_k, available)]; None when the conversation is shorter than min_k."""
    messages = list(pair["chosen"])
    available = exchanges(messages)
    if available < min_k:
        return None
    k = random.Random(f"{seed}:k:{pair['pair_id']}").randint(min_k, min(max_k, available))
    assistant_ends = [i for i, m in enumerate(messages, start=1) if m["role"] == "assistant"]
    cut = assistant_ends[k - 1] if len(assistant_ends) >= k else len(messages)  # through the k-th answer
    prefix = messages[:cut]
    return {
        "source": pair["source"],
        "context_id": stable_hash([pair["pair_id"], k, prefix])[:24],
        "pair_id": pair["pair_id"],
        "k": k,
        "messages": prefix,
    }


def choose_contexts(pairs: list[dict], min_k: int, max_k: int, seed: int,
                    max_contexts: int | None = None) -> tuple[list[dict], int]:
    """The seed contexts of one partition's pairs (dicts with `pair_id`, `row_number`, `chosen`,
    `source`), in row order, and how many pairs were skipped as shorter than `min_k` exchanges.

    With `max_contexts`, the long-enough pairs are ranked by a hash of (seed, pair_id) and the
    `max_contexts` lowest kept: a sample that does not follow the file's order (Skywork-style files
    are ordered by sub-source, so the first N rows would be one sub-source), that does not depend
    on the input's order, and that is stable as the file grows: an old pick stays unless a new
    pair ranks below it."""
    eligible = [p for p in pairs if exchanges(p["chosen"]) >= min_k]
    skipped = len(pairs) - len(eligible)
    eligible = seeded_sample(eligible, max_contexts, seed, key=lambda p: p["pair_id"])
    contexts = [sample_context(p, min_k, max_k, seed) for p in sorted(eligible, key=lambda p: p["row_number"])]
    return contexts, skipped
