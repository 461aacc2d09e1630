"""Seed contexts: the prefixes of seed conversations that the simulation continues."""

from __future__ import annotations

import random

from music_assets.common.hashing import stable_hash


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
