"""Assets that turn pairs into training data: eval_items -> deduplicated_pairs -> training_splits.

All three are unpartitioned: dedup has to see every seed partition at once (duplicates cross
sources) and the splits are a property of the whole data set. They read and write DuckDB through
`DuckDBResource` with the SQL in `sql/`, replacing their tables inside one transaction.
"""


import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_duckdb import DuckDBResource

from music_assets.curation.dedup import DedupResult, deduplicate
from music_assets.curation.prompt_sets import unique_prompts
from music_assets.common.hashing import stable_hash
from music_assets.seeds.ingest import ingest
from music_assets.common.metadata import markdown_preview, table_metadata
from music_assets.curation.splits import SPLITS, VARIANTS, assign_splits, composition, variants
from music_assets.common.tables import frame, replace_rows, sql
from resources.stage_config import CurationResource
from resources.seed_catalog import validate_source_name

EVAL_VERSION = "eval-items-v3"  # v3: one prompt per item in prompt-only sets (repeats dropped)
DEDUP_VERSION = "dedup-v1"
SPLITS_VERSION = "splits-v2"  # v2: exports carry group_id


@asset(code_version=EVAL_VERSION, group_name="curation", pool="duckdb_writers")
def eval_items(context: AssetExecutionContext, data: CurationResource, duckdb: DuckDBResource) -> MaterializeResult:
    """Registered evaluation sets (a file or a Hugging Face dataset), normalized like the seeds,
    each row's `subset` kept; bad rows go to eval_quarantine. A prompt-only set (MT-Bench, HH or
    UltraInteract prompts) keeps one row per prompt (music_assets/curation/prompt_sets.py)."""
    items, quarantine, fingerprints, repeated = [], [], {}, {}
    for name, spec in sorted(data.settings().eval_sets.items()):
        source = spec.source(validate_source_name(name))
        fingerprints[name] = source.fingerprint()
        result = ingest(source)
        rows, repeated[name] = unique_prompts(result.pairs)
        for row, item_id in zip(rows, item_ids(name, rows)):
            extra = json.loads(row["extra"]) if row["extra"] else {}
            items.append(
                {"eval_set": name, "item_id": item_id, "row_number": row["row_number"], "kind": row["kind"],
                 "subset": str(extra["subset"]) if extra.get("subset") is not None else None,
                 "chosen": row["chosen"], "rejected": row["rejected"], "user_turns": row["user_turns"],
                 "extra": row["extra"]}
            )
        quarantine += [{"eval_set": name, **{k: q[k] for k in ("row_number", "rule", "field", "reason", "raw_excerpt")}}
                       for q in result.quarantine]
        context.log.info(f"eval set {name}: {len(rows)} items, {repeated[name]} repeated prompts dropped, "
                         f"{len(result.quarantine)} quarantined")
    df, bad = frame("eval_items", items), frame("eval_quarantine", quarantine)
    with duckdb.get_connection() as con:
        replace_rows(con, {"eval_items": df, "eval_quarantine": bad})
    return MaterializeResult(
        data_version=DataVersion(stable_hash(fingerprints)),
        metadata={
            **table_metadata(df, df.select("item_id", "kind", "subset", "user_turns")),
            "items_per_set": MetadataValue.json(dict(Counter(df["eval_set"].to_list()))),
            "quarantined": MetadataValue.json(dict(Counter(bad["rule"].to_list()))),
            "repeated_prompts_dropped": MetadataValue.json(repeated),
            "file_sha256": MetadataValue.json(fingerprints),
        },
    )


def item_ids(name: str, pairs: list[dict]) -> list[str]:
    """'<set>/<id>' from the rows' own ids (RewardBench's `id`, MT-Bench's `question_id`) when every
    row has one and none repeats, so an item is findable in the original set; else '<set>/<row>'."""
    ids = [row["original_id"] for row in pairs]
    if None in ids or len(set(ids)) != len(ids):
        return [row["pair_id"] for row in pairs]
    return [f"{name}/{i}" for i in ids]


@asset(
    deps=["seed_conversations", "music_pairs", "eval_items"],
    code_version=DEDUP_VERSION,
    group_name="curation",
    pool="duckdb_writers",
    check_specs=[AssetCheckSpec("removal_counts_add_up", asset="deduplicated_pairs", blocking=True)],
)
def deduplicated_pairs(context: AssetExecutionContext, data: CurationResource, duckdb: DuckDBResource):
    """Seed and MUSIC pairs without exact duplicates, near-duplicates (MinHash LSH, verified with
    exact Jaccard) or evaluation leaks; each removed pair is in dedup_removed with its reason."""
    with duckdb.get_connection() as con:
        con.execute(sql("curation/dedup_training_source"))
        eval_messages = con.execute(sql("curation/eval_user_messages")).pl()
        result = deduplicate(con, eval_messages, data.settings())
        con.execute(sql("curation/dedup_persist"))
        counts = dict(zip(("input_pairs", "kept", "removed", "quarantined"), con.execute(sql("curation/dedup_counts")).fetchone()))
        kept = con.execute("SELECT origin, source, pair_id, group_id, user_turns FROM music.deduplicated_pairs").pl()
        removed = con.execute("SELECT * FROM music.dedup_removed ORDER BY rule, pair_id").pl()
        quarantined = con.execute("SELECT * FROM music.dedup_quarantine").pl()
        content_version = con.execute(sql("curation/pairs_content_version")).fetchone()[0]
    context.log.info(f"dedup: {result.as_dict()}")
    yield MaterializeResult(
        data_version=DataVersion(content_version),
        metadata={
            **table_metadata(kept, kept.select("pair_id", "origin", "source", "user_turns")),
            "dedup": MetadataValue.json(result.as_dict()),
            "kept_by_origin": MetadataValue.json(dict(Counter(kept["origin"].to_list()))),
            "removed_by_rule": MetadataValue.json(dict(Counter(removed["rule"].to_list()))),
            "removed_examples": MetadataValue.md(markdown_preview(removed.select("pair_id", "rule", "duplicate_of", "similarity"), 10)),
            "quarantined_by_rule": MetadataValue.json(dict(Counter(quarantined["rule"].to_list()))),
            "eval_messages_checked": eval_messages.height,
        },
    )
    adds_up = counts["input_pairs"] == counts["kept"] + counts["removed"] + counts["quarantined"] and result.accounted()
    yield AssetCheckResult(
        check_name="removal_counts_add_up",
        passed=adds_up,
        description=(f"{counts['input_pairs']} input = {counts['kept']} kept + {counts['removed']} removed "
                     f"+ {counts['quarantined']} quarantined" + ("" if adds_up else ": MISMATCH")),
        metadata={k: v for k, v in counts.items()},
    )


@asset(
    deps=["deduplicated_pairs"],
    code_version=SPLITS_VERSION,
    group_name="curation",
    pool="duckdb_writers",
    check_specs=[
        AssetCheckSpec("no_pair_in_two_splits", asset="training_splits", blocking=True),
        AssetCheckSpec("no_held_out_or_eval_duplicate_in_train", asset="training_splits", blocking=True),
    ],
)
def training_splits(context: AssetExecutionContext, data: CurationResource, duckdb: DuckDBResource):
    """Baseline (D) and MUSIC (D + D_MUSIC) train/validation/test splits, grouped by seed
    conversation, plus TRL-compatible JSONL and Parquet exports of every split."""
    cfg = data.settings()
    if cfg.exports_dir is None:
        raise ValueError("data.exports_dir is not set (the settings loader sets it to <home>/exports)")
    with duckdb.get_connection() as con:
        pairs = con.execute("SELECT origin, source, pair_id, group_id, user_turns FROM music.deduplicated_pairs").pl()
        rows = variants(assign_splits(pairs, cfg.split_seed, cfg.validation_fraction, cfg.test_fraction),
                        cfg.split_seed, cfg.music_ratio)
        table = frame("training_splits", rows.to_dicts())
        replace_rows(con, {"training_splits": table})
        exported = _export(con, Path(cfg.exports_dir))
        overlaps = con.execute(sql("curation/split_overlaps")).pl()
        con.execute(sql("curation/split_leak_source"))
        eval_messages = con.execute(sql("curation/eval_user_messages")).pl()
        recheck = deduplicate(con, eval_messages, cfg)
        leaks = con.execute(sql("curation/split_leaks")).pl()
        content_version = con.execute(sql("curation/pairs_content_version")).fetchone()[0]

    comp = composition(table)
    context.log.info(f"splits: {json.dumps(comp)}")
    yield MaterializeResult(
        # the pairs' content and where each one went: an edited pair or a new assignment is a new version
        data_version=DataVersion(stable_hash([content_version,
                                              sorted(map(tuple, table.select("variant", "split", "pair_id").rows()))])),
        metadata={
            **table_metadata(table, table.select("variant", "split", "pair_id", "origin", "user_turns")),
            "composition": MetadataValue.json(comp),
            "exports": MetadataValue.json(exported),
            "exports_dir": MetadataValue.path(str(Path(cfg.exports_dir).resolve())),
            "split_seed": cfg.split_seed,
            "music_ratio": cfg.music_ratio if cfg.music_ratio is not None else "all",
        },
    )
    yield AssetCheckResult(
        check_name="no_pair_in_two_splits",
        passed=overlaps.is_empty(),
        description=f"{overlaps.height} pairs or seed conversations found in more than one split of a variant",
        metadata={"overlaps": MetadataValue.md(markdown_preview(overlaps, 10))},
    )
    yield AssetCheckResult(
        check_name="no_held_out_or_eval_duplicate_in_train",
        passed=leaks.is_empty(),
        description=(f"re-deduplicating the augmented variant (held-out first, {eval_messages.height} eval messages): "
                     f"{leaks.height} train pairs duplicate a held-out pair or an eval item"),
        metadata={"recheck": MetadataValue.json(_summary(recheck)), "leaks": MetadataValue.md(markdown_preview(leaks, 10))},
    )


def _summary(result: DedupResult) -> dict:
    return {k: v for k, v in result.as_dict().items() if k != "seconds"}


def _export(con, exports_dir: Path) -> dict:
    """Writes <exports_dir>/<variant>/<split>.{jsonl,parquet}; each variant's folder is replaced
    whole (written to a temp folder, then renamed), so a reader never sees a half-written set."""
    exports_dir.mkdir(parents=True, exist_ok=True)
    counts: dict = {}
    for variant in VARIANTS:
        tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=exports_dir))
        counts[variant] = {}
        for split in SPLITS:
            df = con.execute(sql("curation/training_split_pairs"), {"variant": variant, "split": split}).pl()
            df.write_ndjson(tmp / f"{split}.jsonl")
            df.write_parquet(tmp / f"{split}.parquet")
            counts[variant][split] = df.height
        final = exports_dir / variant
        old = exports_dir / f".{variant}-old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    return counts
