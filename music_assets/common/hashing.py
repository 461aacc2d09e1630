"""Content hashes that identify pairs, contexts and generations across runs and machines."""

from __future__ import annotations

import hashlib
import json


def stable_hash(value) -> str:
    """A content hash that does not depend on dict key order, process or platform."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]


def hash_rank(seed, key) -> str:
    """Where `key` falls in the seeded order that samples are drawn from: a hash, so the order
    follows neither a file's layout (Skywork-style files are sorted by sub-source) nor the order the
    keys arrive in."""
    return stable_hash([seed, key])


def seeded_sample(items: list, limit: int | None, seed, key=lambda item: item) -> list:
    """The `limit` items whose `key` ranks first under `hash_rank` (all of them when `limit` is
    None), in rank order. Stable as data grows: an old pick stays picked unless a new item ranks
    above it, so re-running on a grown set keeps most of the earlier sample."""
    ranked = sorted(items, key=lambda item: hash_rank(seed, key(item)))
    return ranked if limit is None else ranked[:limit]
