"""Metadata every table asset reports, so the Dagster UI shows what a materialization holds, and
the look-up of what a materialization recorded (used by the sensor, the assets and the lineage audit)."""

from __future__ import annotations

import polars as pl
from dagster import AssetKey, AssetRecordsFilter, MetadataValue, TableColumn, TableSchema

PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 120


def table_metadata(df: pl.DataFrame, preview: pl.DataFrame | None = None) -> dict:
    """Row count, column schema and a markdown preview, under Dagster's standard keys."""
    return {
        "dagster/row_count": df.height,
        "dagster/column_schema": TableSchema(
            columns=[TableColumn(name=name, type=str(dtype)) for name, dtype in df.schema.items()]
        ),
        "preview": MetadataValue.md(markdown_preview(df if preview is None else preview)),
    }


def markdown_preview(df: pl.DataFrame, rows: int = PREVIEW_ROWS) -> str:
    if df.height == 0:
        return "_no rows_"
    head = df.head(rows)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    for row in head.iter_rows():
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def render_conversation(messages: list[dict], max_chars: int = 300) -> str:
    """A conversation as markdown, one quoted paragraph per message."""
    out = []
    for m in messages:
        text = m["content"] if len(m["content"]) <= max_chars else m["content"][:max_chars] + " …"
        out.append(f"**{m['role']}**: " + text.replace("\n", " "))
    return "\n\n".join(out)


def _cell(value) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= PREVIEW_CELL_CHARS else text[:PREVIEW_CELL_CHARS] + "…"


def latest_materialization(instance, key: AssetKey, partition: str | None = None, before: int | None = None):
    """The newest materialization record of `key` (of one partition when given), optionally only
    those stored before event `before`; None when there is none."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition is not None else None,
                           before_storage_id=before),
        limit=1,
    ).records
    return records[0] if records else None
