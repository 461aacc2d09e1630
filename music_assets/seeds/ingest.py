"""Turns one seed source (or one shard of it) into normalized rows and quarantine rows (no
Dagster, no database).

Kept free of Dagster so the rules can be tested directly and reused by the CLI. The asset in
`music_assets/seeds/assets.py` wraps this and writes the two tables.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from music_assets.common.hashing import stable_hash
from music_assets.common.sequences import common_prefix_length
from music_assets.seeds.formats import DEFAULT_MAX_MESSAGE_CHARS, RowRejected, normalize
from music_assets.seeds.reader import ResolvedSource
from music_assets.seeds.shards import seed_pair_id


@dataclass
class IngestResult:
    pairs: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.pairs) + len(self.quarantine)

    @property
    def quarantine_share(self) -> float:
        return len(self.quarantine) / self.total if self.total else 0.0

    def reasons(self) -> dict[str, int]:
        """Quarantine counts per rule, most frequent first."""
        return dict(Counter(q["rule"] for q in self.quarantine).most_common())


def ingest(source: ResolvedSource, max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS) -> IngestResult:
    """The rows of `source` (of its shard, if it is one). The `source` column is the partition key,
    the pair id `<source name>/<row_number>` whatever the shard (see music_assets/seeds/shards.py)."""
    result = IngestResult()
    partition = source.partition_key
    for raw in source.rows():
        if raw.error is not None:
            result.quarantine.append(_quarantine(partition, raw.row_number, "malformed_json", "", raw.error, raw.raw))
            continue
        try:
            pair = normalize(raw.record, source.format, max_message_chars)
        except RowRejected as exc:
            result.quarantine.append(
                _quarantine(partition, raw.row_number, exc.rule, exc.field, exc.reason, raw.raw)
            )
            continue
        prefix = common_prefix_length([pair.chosen, pair.rejected]) if pair.kind == "pair" else len(pair.chosen)
        result.pairs.append(
            {
                "source": partition,
                "row_number": raw.row_number,
                "pair_id": seed_pair_id(source.name, raw.row_number),
                "kind": pair.kind,
                "format": pair.format,
                "original_id": _printable(pair.original_id) if pair.original_id else None,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "prefix_messages": prefix,
                "chosen_messages": len(pair.chosen),
                "rejected_messages": len(pair.rejected),
                "user_turns": sum(m["role"] == "user" for m in pair.chosen),
                "context_hash": stable_hash(pair.chosen[:prefix]),
                "content_hash": stable_hash({"chosen": pair.chosen, "rejected": pair.rejected}),
                "extra": _printable(json.dumps(pair.extra, ensure_ascii=False, sort_keys=True, default=str))
                if pair.extra
                else None,
            }
        )
    return result


def _quarantine(source: str, row_number: int, rule: str, field_name: str, reason: str, raw: str) -> dict:
    return {
        "source": source,
        "row_number": row_number,
        "rule": rule,
        "field": field_name,
        "reason": reason,
        "raw_excerpt": _printable(raw),
    }


def _printable(text: str) -> str:
    """Lone surrogates (undecodable bytes, or bad JSON escapes) cannot be stored: show U+FFFD."""
    return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")

