"""The warehouse as Dagster resources: the connection resource that assets query through, and the
IO manager that stores asset outputs as tables.

Two backends run the same SQL (`warehouse.backend` in the config):
- `duckdb` (the default): one DuckDB file, no server. One process writes it at a time, so the
  writing steps share the `duckdb_writers` pool, which the demo's instance limits to one step.
- `ducklake`: DuckDB's lakehouse format, for many writers on many machines. A catalog database
  (Postgres) holds the tables' metadata and commits each transaction as a snapshot; the rows are
  Parquet files under a data path that every writer reaches (a shared folder or an object-store
  URL). Every connection is a fresh in-memory DuckDB that attaches the lake as `lake` and makes it
  the default catalog, so `music.<table>` means the same table on both backends. Writers of
  different partitions do not wait for each other: DuckLake retries a commit that raced another.

Both resources create the warehouse's schema (`sql/<stage>/schema.sql`, every statement
idempotent) when Dagster initializes them for a run's step, before any asset code runs: asset
code never creates tables, and a table always has the declared column types rather than whatever
a first DataFrame happened to infer. Under `dagster.materialize` (the demo, the tests) that is
once per run; under the multiprocess executor of `dagster dev`, once per step process.
"""

from __future__ import annotations

import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import duckdb
from dagster import Config, InitResourceContext
from dagster._core.storage.db_io_manager import DbIOManager
from dagster._utils.backoff import backoff
from dagster_duckdb import DuckDBResource
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_polars import DuckDBPolarsIOManager
from pydantic import Field

from music_assets.common.tables import create_schema, schema_ddl

LAKE_ALIAS = "lake"
# Where schema creation gives up racing other writers (each try sees more of the tables as there).
SCHEMA_TRIES = 5


class DuckLake(Config):
    """Where a DuckLake warehouse lives; its credentials come from the environment, never the config."""

    catalog: str = Field(description=(
        "the catalog database as DuckLake's ATTACH takes it after `ducklake:`, e.g. "
        "`postgres:dbname=music host=db.internal user=music` (libpq keywords; the password from "
        "PGPASSWORD or ~/.pgpass)"))
    data_path: str = Field(description=(
        "where the Parquet data files go: a folder every writer sees, or an object-store URL (s3://...; "
        "its extension package and a DuckDB secret, e.g. from the environment, are the user's to add)"))


def extension_directory() -> Path:
    """The folder of DuckDB extension files that the `duckdb-ext-*` packages install (they share the
    `duckdb_ext` namespace package). DuckDB finds `<this>/v<version>/<platform>/<name>.duckdb_extension`
    there and loads it when a statement needs it: nothing is downloaded."""
    try:
        import duckdb_ext
    except ImportError:
        raise RuntimeError(_missing("ducklake")) from None
    folders = [Path(p) / "extensions" for p in duckdb_ext.__path__]
    return next((f for f in folders if (f / f"v{duckdb.__version__}").is_dir()), folders[0])


def _missing(name: str) -> str:
    return (f"the DuckLake warehouse needs DuckDB's {name} extension for DuckDB {duckdb.__version__}: "
            f"pip install duckdb-ext-{name}=={duckdb.__version__}.* (scripts/setup.sh installs it)")


# The attached in-memory DuckDB of each lake (and connection config) this process opened.
_ATTACHED: dict[tuple[str, str, str], duckdb.DuckDBPyConnection] = {}
_ATTACHING = threading.Lock()


def connect_lake(lake: DuckLake, config: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A new connection to the lake, with the lake as its default catalog: its own transactions and
    temp tables. The in-memory DuckDB that attaches the lake is made once per process and each
    connection is a cursor on it (loading the extensions and attaching take about a second; a
    cursor, milliseconds)."""
    key = (lake.catalog, lake.data_path, repr(sorted((config or {}).items())))
    with _ATTACHING:
        if key not in _ATTACHED:
            _ATTACHED[key] = _attach(lake, config or {})
        con = _ATTACHED[key].cursor()
    con.execute(f"USE {LAKE_ALIAS}")
    return con


def _attach(lake: DuckLake, config: dict[str, Any]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:", config={**config, "extension_directory": str(extension_directory()),
                                             "autoinstall_known_extensions": False,
                                             "autoload_known_extensions": True})
    try:
        for name in ("ducklake", *(("postgres_scanner",) if lake.catalog.startswith("postgres:") else ())):
            try:
                con.execute(f"LOAD {name}")
            except duckdb.IOException:
                raise RuntimeError(_missing(name.removesuffix("_scanner"))) from None
        for attempt in range(1, SCHEMA_TRIES + 1):
            try:
                con.execute(f"ATTACH {_literal('ducklake:' + lake.catalog)} AS {LAKE_ALIAS} "
                            f"(DATA_PATH {_literal(lake.data_path)})")
                break
            except duckdb.Error as exc:  # on an empty catalog database, every writer that starts at
                # once creates DuckLake's own tables, and all but one fail: the next try finds them
                if "Failed to initialize DuckLake" not in str(exc) or attempt == SCHEMA_TRIES:
                    raise
                time.sleep(0.2 * attempt)
    except BaseException:
        con.close()
        raise
    return con


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_lake_schema(con) -> None:
    """`create_schema` on the lake, statement by statement, tried again when another writer created
    the same table first: on a fresh lake every step that starts at once creates the tables, and
    DuckLake refuses all but the first commit of each. The DDL is idempotent, so the next try skips
    what the winner created. One statement DuckLake does not treat as idempotent: dropping a NOT
    NULL that is not there (DuckDB accepts it; the schema files use it to migrate old warehouses)."""
    for attempt in range(1, SCHEMA_TRIES + 1):
        try:
            for statement in con.extract_statements(schema_ddl()):
                try:
                    con.execute(statement)
                except duckdb.CatalogException as exc:
                    if "has no NOT NULL constraint" not in str(exc):
                        raise
            return
        except duckdb.TransactionException:
            if attempt == SCHEMA_TRIES:
                raise
            time.sleep(0.2 * attempt)


class Warehouse(DuckDBResource):
    """`DuckDBResource` on either backend, which makes sure the schema exists before a step uses it.
    `database` is the DuckDB file; it is not used when `ducklake` is set."""

    ducklake: DuckLake | None = Field(default=None, description="the shared DuckLake warehouse, when set")

    def setup_for_execution(self, context: InitResourceContext) -> None:
        super().setup_for_execution(context)
        with self.get_connection() as con:
            create_lake_schema(con) if self.ducklake else create_schema(con)

    @contextmanager
    def get_connection(self):
        if self.ducklake is None:
            with super().get_connection() as con:
                yield con
            return
        with closing(connect_lake(self.ducklake, self.connection_config)) as con:
            yield con


class _LakeClient(DuckDbClient):
    """The DuckDB IO manager's client with its connections opened on the lake."""

    def __init__(self, lake: DuckLake, config: dict[str, Any]):
        self.lake, self.config = lake, config

    @contextmanager
    def connect(self, context, table_slice):
        with closing(connect_lake(self.lake, self.config)) as con:
            yield con


class WarehouseIOManager(DuckDBPolarsIOManager):
    """`DuckDBPolarsIOManager` on either backend, which makes sure the schema exists before it
    writes an output."""

    ducklake: DuckLake | None = Field(default=None, description="the shared DuckLake warehouse, when set")

    def create_io_manager(self, context):
        if self.ducklake is None:
            # retried like dagster-duckdb's own connections: a reader (the UI, the lineage audit, a
            # notebook, a test polling the file) may hold its lock for a moment
            con = backoff(fn=duckdb.connect, retry_on=(RuntimeError, duckdb.IOException),
                          kwargs={"database": self.database, "read_only": False, "config": self.connection_config},
                          max_retries=10)
            try:
                create_schema(con)
            finally:
                con.close()
            return super().create_io_manager(context)
        client = _LakeClient(self.ducklake, self.connection_config)
        with client.connect(context, None) as con:
            create_lake_schema(con)
        return DbIOManager(db_client=client, database=LAKE_ALIAS, schema=self.schema_,
                           type_handlers=self.type_handlers(), default_load_type=self.default_load_type(),
                           io_manager_name="DuckDBIOManager")
