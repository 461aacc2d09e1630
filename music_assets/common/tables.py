"""Where our SQL lives and what our tables look like.

SQL is kept in `sql/<stage>/*.sql` files (one statement file per purpose). The Polars schema of each table
we write is derived from the stages' `sql/<stage>/schema.sql` by running the DDL in an in-memory DuckDB, so Python and
the database can never disagree about column order or types.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import duckdb
import polars as pl

# The database file must not be called music.duckdb: its catalog name would clash with this schema.
SCHEMA = "music"


@cache
def sql_dir() -> Path:
    """`sql/` at the repository root (editable install) or `music_assets/_sql` (wheel install)."""
    package = Path(__file__).resolve().parent.parent  # music_assets/
    for candidate in (package / "_sql", package.parent / "sql"):
        if (candidate / "seeds" / "schema.sql").is_file():
            return candidate
    raise FileNotFoundError(f"cannot find the sql/ directory next to {package}")


def sql(name: str) -> str:
    """The text of `sql/<name>.sql`; names are `<stage>/<file>`, e.g. `simulation/schema`."""
    return (sql_dir() / f"{name}.sql").read_text()


def schema_ddl() -> str:
    """The warehouse's DDL: each stage's schema file, in the order of the stages (all idempotent)."""
    return "\n".join((sql("seeds/schema"), sql("simulation/schema"), sql("curation/schema"), sql("evaluation/schema")))


def create_schema(con) -> None:
    """Creates whatever tables of the warehouse do not exist yet."""
    con.execute(schema_ddl())


@cache
def polars_schema(table: str) -> pl.Schema:
    con = duckdb.connect(":memory:")
    create_schema(con)
    return con.execute(f"SELECT * FROM {SCHEMA}.{table} LIMIT 0").pl().schema


def frame(table: str, rows: list[dict]) -> pl.DataFrame:
    """A DataFrame with exactly the columns and types of `table` (empty rows give an empty frame)."""
    schema = polars_schema(table)
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


def replace_rows(con, tables: dict[str, pl.DataFrame]) -> None:
    """Replaces the rows of each `music.<table>` with a DataFrame's, all in one transaction, so a
    failure leaves the previous contents (unlike the IO manager, an empty frame empties the table)."""
    con.execute("BEGIN TRANSACTION")
    try:
        for table, rows in tables.items():
            con.execute(f"DELETE FROM {SCHEMA}.{table}")
            if rows.height:
                con.register("incoming_rows", rows)
                con.execute(f"INSERT INTO {SCHEMA}.{table} BY NAME SELECT * FROM incoming_rows")
                con.unregister("incoming_rows")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
