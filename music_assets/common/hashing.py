"""Content hashes that identify pairs, contexts and generations across runs and machines."""

from __future__ import annotations

import hashlib
import json


def stable_hash(value) -> str:
    """A content hash that does not depend on dict key order, process or platform."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]
