"""Sharded seed sources: one large source as K Dagster partitions that run side by side.

A source with `shards: K` (K > 1) is ingested and simulated as K partitions with the keys
`<source>/shard-<n>-of-<K>` (n = 1..K, both zero-padded to three digits so the keys sort in
shard order). A row belongs to shard n when

    int.from_bytes(sha256(pair_id)[:8], "big") % K == n - 1

where `pair_id` is the row's id without any shard in it, `<source>/<row_number>`. Why this rule:
- every row (pair or quarantined row) is in exactly one shard, and the union of the K shards is
  the unsharded source, row for row;
- a grown file (rows appended) keeps the row numbers, hence the pair ids, hence the shards of its
  old rows: new rows only add to shards (a file edited in the middle renumbers the rows after the
  edit, exactly as it changes their pair ids unsharded);
- the hash spreads a file ordered by sub-source (Skywork is) evenly over the shards.

Changing K moves almost every row to another shard: the rows stored under the old keys would
stay in the warehouse next to the same rows under the new ones. So K is fixed once a source has
partitions; `registered_shard_conflict` says why a change is refused.

'/' is not allowed in a source name (see `resources/seed_catalog.py`), so the source name is
everything before it and an unsharded key (the bare name) can never look like a shard's.
Dagster allows '/' in a dynamic partition key (it forbids '...' and control characters).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_SHARDS = 999  # three digits in the key; 80k rows in 999 shards is still ~80 rows each
_SHARD_KEY = re.compile(r"^(?P<name>[^/]+)/shard-(?P<number>\d{3})-of-(?P<count>\d{3})$")


def seed_pair_id(source_name: str, row_number: int) -> str:
    """A seed row's id, `<source>/<row_number>`: the same whatever the source's shard count."""
    return f"{source_name}/{row_number}"


def shard_number(pair_id: str, count: int) -> int:
    """The shard (1..count) that holds the row with this pair id."""
    return int.from_bytes(hashlib.sha256(pair_id.encode("utf-8")).digest()[:8], "big") % count + 1


@dataclass(frozen=True)
class Shard:
    """Shard `number` of `count` of one source."""

    number: int  # 1..count
    count: int

    def __post_init__(self):
        if not 2 <= self.count <= MAX_SHARDS or not 1 <= self.number <= self.count:
            raise ValueError(f"shard {self.number} of {self.count}: need 2 <= count <= {MAX_SHARDS} "
                             "and 1 <= number <= count")

    def key(self, source_name: str) -> str:
        return f"{source_name}/shard-{self.number:03d}-of-{self.count:03d}"

    def row_filter(self, source_name: str) -> Callable[[int], bool]:
        """Whether a row number of the source is in this shard (decided before the row is parsed)."""
        return lambda row_number: shard_number(seed_pair_id(source_name, row_number), self.count) == self.number

    def quota(self, total: int) -> int:
        """This shard's part of a per-source limit (`simulation.max_contexts`): the K parts add up
        to `total`, the first `total % K` shards taking one more."""
        return total // self.count + (self.number <= total % self.count)


def partition_keys(source_name: str, shards: int) -> list[str]:
    """The partition keys of a source split into `shards` (1: the bare name, as unsharded)."""
    if shards == 1:
        return [source_name]
    return [Shard(n, shards).key(source_name) for n in range(1, shards + 1)]


def split_partition_key(key: str) -> tuple[str, Shard | None]:
    """(source name, shard) of a seed partition key; the shard is None for an unsharded source."""
    match = _SHARD_KEY.match(key)
    if match is None:
        if "/" in key:
            raise ValueError(f"seed partition key {key!r}: expected '<source>' or '<source>/shard-NNN-of-KKK'")
        return key, None
    return match["name"], Shard(int(match["number"]), int(match["count"]))


def source_name_of(key: str) -> str:
    """The source a seed partition key (sharded or not) belongs to."""
    return split_partition_key(key)[0]


def shard_count(key: str) -> int:
    """How many shards the source of a partition key was split into when the key was made."""
    shard = split_partition_key(key)[1]
    return 1 if shard is None else shard.count


def registered_shard_conflict(source_name: str, shards: int, registered: Iterable[str]) -> str | None:
    """Why `shards` cannot be used for a source whose registered partitions (keys of any source)
    were made with another shard count, or None. Re-sharding would move rows between partitions
    and leave the old partitions' rows in the warehouse next to the moved ones."""
    wanted = set(partition_keys(source_name, shards))
    own = sorted(k for k in registered if _belongs(k, source_name))
    stale = [k for k in own if k not in wanted]
    if not stale:
        return None
    was = " or ".join(str(c) for c in sorted({shard_count(k) for k in stale}))
    shown = ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
    return (f"seed source {source_name!r} has partitions made with shards: {was} ({shown}), "
            f"but its config says shards: {shards}. Changing a source's shard count would move its rows to "
            f"other partitions and leave the old partitions' rows in the warehouse; set shards back to {was}, "
            f"or register the data under a new source name")


def _belongs(key: str, source_name: str) -> bool:
    try:
        return source_name_of(key) == source_name
    except ValueError:
        return False
