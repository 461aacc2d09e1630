"""What sequences have in common: the one place that counts a shared prefix.

Three stages ask the same question of different items: ingest of two conversations' messages (where a
seed pair starts to differ), the pair encoder of two sides' token ids (how much a packed row encodes
once), and Best-of-N scoring of N candidates' token ids. One counter keeps them from disagreeing on
what "shared" means.
"""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix_length(seqs: Sequence[Sequence], start: int = 0) -> int:
    """How many leading items all of `seqs` share from index `start` on (0 for no sequences or one that
    ends there); items compare with `==`, so messages (dicts) and token ids both work. `start` spares a
    caller that already knows the first items agree (a trie one level down) a copy of every tail."""
    shortest = min((len(s) for s in seqs), default=0)
    n = start
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return max(n - start, 0)
