"""Removes exact duplicates, near-duplicates and evaluation leaks from a set of preference pairs.

Works on a DuckDB connection that has a view `dedup_source(pair_id, priority, chosen, rejected)`
(lower priority = kept when duplicates collide; e.g. seed pairs before MUSIC pairs). One streaming
pass over the pairs, in chunks, computes per pair (see `minhash.py`):

1. bad input -> quarantine: a missing or repeated id, a non-string (NULL) role or content, or no
   words at all after normalization;
2. evaluation leaks: a user message of the pair that contains at least `eval_threshold` of the word
   shingles of an evaluation item's user message (containment, not Jaccard: an MT-Bench question
   pasted into a longer request is still a leak);
3. the exact-duplicate key (hash of the normalized pair text) and LSH band keys.

Then DuckDB does the set work (`sql/dedup_*.sql`): exact duplicate groups, and LSH candidates
(documents sharing a band key with the band's first document). Candidates are verified with the
*exact* Jaccard similarity of their shingle sets, so precision does not depend on signature noise,
and removed greedily in keep-order: a pair goes when it is a near-duplicate of a pair that stays.

Every input row ends in exactly one place: kept, `removed` (rule, the id it duplicates, the
similarity) or `quarantine` (rule, reason).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import duckdb
import numpy as np
import polars as pl

from music_assets.curation.config import CurationConfig
from music_assets.curation.minhash import ShingleConfig, band_keys, jaccard, normalize, shingle_hashes, shingle_sets, signatures
from music_assets.common.tables import sql

QUARANTINE_REASONS = {
    "missing_id": "pair_id is missing or blank",
    "duplicate_id": "pair_id appears more than once in the input; the first occurrence is kept",
    "non_string_content": "a message, role or content is missing or not a string",
    "empty_text": "no words left after normalization",
}


@dataclass
class DedupResult:
    input_pairs: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)  # per rule: exact, near, eval_leak
    quarantined: Counter = field(default_factory=Counter)
    candidates: int = 0  # LSH candidate edges verified
    seconds: dict = field(default_factory=dict)

    def accounted(self) -> bool:
        return self.input_pairs == self.kept + sum(self.removed.values()) + sum(self.quarantined.values())

    def as_dict(self) -> dict:
        return {
            "input_pairs": self.input_pairs,
            "kept": self.kept,
            "removed": dict(self.removed),
            "quarantined": dict(self.quarantined),
            "lsh_candidates": self.candidates,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


class EvalIndex:
    """Shingles of evaluation user messages, for containment lookups of training messages."""

    def __init__(self, items: pl.DataFrame, cfg: ShingleConfig):
        """`items` has columns item_id, text (one row per eval user message)."""
        items = items.filter(pl.col("text").is_not_null())
        doc, hashes = shingle_hashes(normalize(items["text"]), cfg)
        table = pl.DataFrame({"eval_row": doc, "hash": hashes}).unique()
        sizes = table.group_by("eval_row").len("eval_shingles")
        self.table = table.join(sizes, on="eval_row")
        self.item_ids = items["item_id"].to_list()
        self.hash_set = np.unique(hashes)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.item_ids)

    def leaks(self, message_doc: np.ndarray, messages: pl.Series, threshold: float) -> pl.DataFrame:
        """(doc, item_id, containment) for the best leak of each document that has one.
        `messages[i]` is a user message of document `message_doc[i]`."""
        if not len(self) or not len(messages):
            return pl.DataFrame(schema={"doc": pl.Int64, "item_id": pl.String, "containment": pl.Float64})
        row, hashes = shingle_hashes(normalize(messages), self.cfg)
        hit = np.isin(hashes, self.hash_set)
        found = pl.DataFrame({"row": row[hit], "hash": hashes[hit]}).unique()
        matches = (
            found.join(self.table, on="hash")
            .group_by("row", "eval_row", "eval_shingles")
            .len("shared")
            .with_columns(containment=pl.col("shared") / pl.col("eval_shingles"))
            .filter(pl.col("containment") >= threshold)
        )
        ids = pl.Series(self.item_ids)
        return (
            matches.with_columns(doc=pl.Series(message_doc)[matches["row"]], item_id=ids[matches["eval_row"]])
            .sort("containment", descending=True)
            .unique("doc", keep="first")
            .select("doc", "item_id", "containment")
        )


def deduplicate(con: duckdb.DuckDBPyConnection, eval_items: pl.DataFrame | None, cfg: CurationConfig) -> DedupResult:
    """Runs the whole dedup on `dedup_source`; leaves `dedup_removed`, `dedup_quarantine`,
    `dedup_kept(doc, pair_id)` and `dedup_kept_bands(doc, key)` as temp tables on `con`."""
    result = DedupResult()
    con.execute(sql("curation/dedup_work_tables"))
    eval_index = EvalIndex(eval_items if eval_items is not None else pl.DataFrame(schema={"item_id": pl.String, "text": pl.String}), cfg.shingles())

    started = time.perf_counter()
    docs, bands, flags = [], [], []
    reader = con.execute(sql("curation/dedup_stream")).fetch_record_batch(cfg.dedup_chunk_pairs)  # DuckDB 1.4 (pinned)
    offset = 0
    for batch in reader:
        chunk = pl.from_arrow(batch)
        d, b, f = _process_chunk(chunk, offset, eval_index, cfg)
        docs.append(d), bands.append(b), flags.append(f)
        offset += chunk.height
    result.input_pairs = offset
    result.seconds["signatures"] = time.perf_counter() - started

    started = time.perf_counter()
    _insert(con, "dedup_docs", pl.concat(docs) if docs else None)
    _insert(con, "dedup_bands", pl.concat(bands) if bands else None)
    _insert(con, "dedup_flags", pl.concat(flags, how="vertical_relaxed") if flags else None)
    con.execute(sql("curation/dedup_exact"))
    candidates = con.execute(sql("curation/dedup_candidates")).pl()
    result.seconds["sql"] = time.perf_counter() - started

    started = time.perf_counter()
    result.candidates = candidates.height
    near = _verify(con, candidates, cfg)
    _insert(con, "dedup_flags", near)
    result.seconds["verify"] = time.perf_counter() - started

    con.execute(sql("curation/dedup_results"))
    for rule, n in con.execute("SELECT rule, count(*) FROM dedup_removed GROUP BY rule").fetchall():
        result.removed[rule] = n
    for rule, n in con.execute("SELECT rule, count(*) FROM dedup_quarantine GROUP BY rule").fetchall():
        result.quarantined[rule] = n
    result.kept = con.execute("SELECT count(*) FROM dedup_kept").fetchone()[0]
    return result


def _process_chunk(chunk: pl.DataFrame, offset: int, eval_index: EvalIndex, cfg: CurationConfig):
    n = chunk.height
    doc = np.arange(offset, offset + n, dtype=np.int64)
    norm = normalize(chunk["text"].fill_null(""))
    rule = chunk["bad_rule"].to_numpy().astype(object)
    rule = np.where((rule == None) & (norm.str.len_chars().to_numpy() == 0), "empty_text", rule)  # noqa: E711
    bad = rule != None  # noqa: E711
    flags = [
        pl.DataFrame(
            {"doc": doc[bad], "rule": rule[bad].astype(str)},
            schema={"doc": pl.UInt32, "rule": pl.String},
        ).with_columns(
            detail=pl.col("rule").replace_strict(QUARANTINE_REASONS, return_dtype=pl.String),
            duplicate_of=pl.lit(None, pl.String),
            similarity=pl.lit(None, pl.Float64),
        )
    ]

    # evaluation leaks, on the user messages of pairs that are not quarantined
    if len(eval_index):
        messages = chunk.select(pl.Series("doc", doc), "user_messages").filter(pl.Series(~bad)).explode("user_messages", empty_as_null=True)
        messages = messages.filter(pl.col("user_messages").is_not_null())
        leaks = eval_index.leaks(messages["doc"].to_numpy(), messages["user_messages"], cfg.eval_leak_threshold)
        flags.append(
            leaks.select(
                pl.col("doc").cast(pl.UInt32),
                rule=pl.lit("eval_leak"),
                detail=pl.lit("a user message contains an evaluation item's user message"),
                duplicate_of=pl.col("item_id"),
                similarity=pl.col("containment"),
            )
        )

    shingles = cfg.shingles()
    s_doc, hashes = shingle_hashes(norm, shingles)
    sig = signatures(s_doc, hashes, n, shingles)
    keys = band_keys(sig, shingles)[~bad]
    live_doc = doc[~bad]
    band_frame = pl.DataFrame(
        {"doc": np.repeat(live_doc, keys.shape[1]).astype(np.uint32), "key": keys.reshape(-1)},
        schema={"doc": pl.UInt32, "key": pl.UInt64},
    )
    doc_frame = pl.DataFrame(
        {"doc": doc.astype(np.uint32), "pair_id": chunk["pair_id"], "exact_hash": norm.hash(seed=shingles.seed + 7)},
        schema={"doc": pl.UInt32, "pair_id": pl.String, "exact_hash": pl.UInt64},
    )
    return doc_frame, band_frame, pl.concat(flags, how="vertical_relaxed")


def _verify(con: duckdb.DuckDBPyConnection, candidates: pl.DataFrame, cfg: CurationConfig) -> pl.DataFrame:
    """Exact Jaccard on candidate edges, then greedy removal in keep-order."""
    empty = pl.DataFrame(schema={"doc": pl.UInt32, "rule": pl.String, "detail": pl.String,
                                 "duplicate_of": pl.String, "similarity": pl.Float64})
    if candidates.is_empty():
        return empty
    wanted = np.unique(np.concatenate([candidates["doc"].to_numpy(), candidates["leader"].to_numpy()]))
    shingles: dict[int, np.ndarray] = {}
    for start in range(0, len(wanted), cfg.dedup_chunk_pairs):
        con.register("wanted_docs", pl.DataFrame({"doc": wanted[start : start + cfg.dedup_chunk_pairs]}))
        texts = con.execute(sql("curation/dedup_texts_for_docs")).pl()
        shingles.update(zip(texts["doc"].to_list(), shingle_sets(texts["text"], cfg.shingles())))
    con.unregister("wanted_docs")

    removed: dict[int, tuple[int, float]] = {}
    for doc, leader in candidates.select("doc", "leader").iter_rows():  # sorted by doc, then leader
        if doc in removed and removed[doc][1] >= 1.0 or leader in removed:
            continue
        sim = jaccard(shingles[doc], shingles[leader])
        if sim >= cfg.near_duplicate_threshold and (doc not in removed or sim > removed[doc][1]):
            removed[doc] = (leader, sim)
    if not removed:
        return empty
    pair_ids = dict(con.execute("SELECT doc, pair_id FROM dedup_docs WHERE doc IN (SELECT unnest($d))",
                                {"d": [int(x) for x in {v[0] for v in removed.values()}]}).fetchall())
    return pl.DataFrame(
        {
            "doc": list(removed),
            "rule": "near",
            "detail": f"word-shingle Jaccard >= {cfg.near_duplicate_threshold}",
            "duplicate_of": [pair_ids[v[0]] for v in removed.values()],
            "similarity": [v[1] for v in removed.values()],
        },
        schema=empty.schema,
    )


def _insert(con: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame | None) -> None:
    if frame is None or frame.is_empty():
        return
    con.register("incoming", frame)
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
    con.unregister("incoming")
