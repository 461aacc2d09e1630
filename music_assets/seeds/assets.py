"""Seed ingestion: one seed source (partition) in, normalized pairs and quarantined rows out. A
source configured with `shards: K` is K partitions, each ingesting its own rows of the file
(music_assets/seeds/shards.py); the tables' `source` column is the partition key.

A multi-asset writes both tables in one pass over the source, so a row is either normalized or
quarantined, never both and never neither (the check `rows_accounted_for` would say otherwise).
"""


from collections import Counter

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetOut,
    DataVersion,
    MetadataValue,
    Output,
    multi_asset,
)

from music_assets.common.hashing import stable_hash
from music_assets.seeds.ingest import ingest
from music_assets.common.metadata import markdown_preview, render_conversation, table_metadata
from music_assets.common.partitions import seed_partitions
from music_assets.common.tables import frame
from resources.seed_catalog import SeedCatalog

# Bump when normalization rules change: the new version marks every seed partition stale.
INGEST_VERSION = "ingest-v1"
EXAMPLE_PAIRS = 2


@multi_asset(
    outs={
        "seed_conversations": AssetOut(
            description="Normalized preference pairs (and prompt-only contexts), one row each.",
            metadata={"partition_expr": "source"},
            code_version=INGEST_VERSION,
        ),
        "seed_quarantine": AssetOut(
            description="Seed rows that could not be normalized, with source, row number and reason.",
            metadata={"partition_expr": "source"},
            code_version=INGEST_VERSION,
        ),
    },
    check_specs=[
        AssetCheckSpec(
            "quarantine_share_within_limit",
            asset="seed_conversations",
            blocking=True,
            description="Fails when a source's quarantined share exceeds seed_catalog.max_quarantine_share.",
        ),
        AssetCheckSpec("has_rows", asset="seed_conversations", blocking=True),
    ],
    partitions_def=seed_partitions,
    group_name="seeds",
    pool="duckdb_writers",
)
def seed_ingestion(context: AssetExecutionContext, seed_catalog: SeedCatalog):
    source = seed_catalog.resolve(context.partition_key)
    shard = {} if source.shard is None else {"shard": f"{source.shard.number} of {source.shard.count}"}
    context.log.info(f"ingesting seed source {source.name!r}{' shard ' + shard['shard'] if shard else ''} "
                     f"from {source.location} (format {source.format})")
    fingerprint = source.fingerprint()
    result = ingest(source, seed_catalog.max_message_chars)

    pairs = frame("seed_conversations", result.pairs)
    quarantine = frame("seed_quarantine", result.quarantine)
    share = result.quarantine_share
    reasons = result.reasons()
    yield Output(
        pairs,
        output_name="seed_conversations",
        data_version=DataVersion(stable_hash(sorted(pairs["content_hash"].to_list()))),
        metadata={
            **table_metadata(pairs, pairs.select("pair_id", "format", "user_turns", "prefix_messages", "chosen")),
            "source_location": source.location,
            "source_sha256": fingerprint,
            **shard,
            "rows_read": result.total,
            "rows_quarantined": len(result.quarantine),
            "quarantine_share": round(share, 4),
            "quarantine_reasons": MetadataValue.json(reasons),
            "formats": MetadataValue.json(dict(Counter(pairs["format"].to_list()))),
            "kinds": MetadataValue.json(dict(Counter(pairs["kind"].to_list()))),
            "user_turns_histogram": MetadataValue.json(
                {str(k): v for k, v in sorted(Counter(pairs["user_turns"].to_list()).items())}
            ),
            "examples": MetadataValue.md(_examples(pairs)),
        },
    )
    yield Output(
        quarantine,
        output_name="seed_quarantine",
        data_version=DataVersion(stable_hash(quarantine.select("row_number", "reason").rows())),
        metadata={**table_metadata(quarantine), "quarantine_reasons": MetadataValue.json(reasons)},
    )
    yield AssetCheckResult(
        check_name="quarantine_share_within_limit",
        asset_key="seed_conversations",
        passed=share <= seed_catalog.max_quarantine_share,
        severity=AssetCheckSeverity.ERROR,
        description=(
            f"{len(result.quarantine)} of {result.total} rows quarantined ({share:.1%}); "
            f"limit {seed_catalog.max_quarantine_share:.1%}"
        ),
        metadata={"quarantine_share": share, "limit": seed_catalog.max_quarantine_share,
                  "reasons": MetadataValue.json(reasons)},
    )
    yield AssetCheckResult(
        check_name="has_rows",
        asset_key="seed_conversations",
        passed=pairs.height > 0,
        description=f"{pairs.height} normalized rows",
    )


def _examples(pairs: pl.DataFrame) -> str:
    blocks = []
    for row in pairs.filter(pl.col("kind") == "pair").head(EXAMPLE_PAIRS).iter_rows(named=True):
        shared = row["prefix_messages"]
        blocks.append(
            f"### {row['pair_id']}\n\n{render_conversation(row['chosen'][:shared])}\n\n"
            f"**chosen ending**\n\n{render_conversation(row['chosen'][shared:])}\n\n"
            f"**rejected ending**\n\n{render_conversation(row['rejected'][shared:])}"
        )
    return "\n\n---\n\n".join(blocks) or markdown_preview(pairs)
