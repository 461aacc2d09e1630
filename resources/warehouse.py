"""The DuckDB warehouse as Dagster resources: the connection resource that assets query through,
and the IO manager that stores asset outputs as tables.

Both create the warehouse's schema (`sql/<stage>/schema.sql`, every statement idempotent) when
Dagster initializes them for a run's step, before any asset code runs: asset code never creates
tables, and a table always has the declared column types rather than whatever a first DataFrame
happened to infer. Under `dagster.materialize` (the demo, the tests) that is once per run; under
the multiprocess executor of `dagster dev`, once per step process, which costs milliseconds.
"""

from __future__ import annotations

from dagster import InitResourceContext
from dagster_duckdb import DuckDBResource
from dagster_duckdb_polars import DuckDBPolarsIOManager

from music_assets.common.tables import create_schema


class Warehouse(DuckDBResource):
    """`DuckDBResource` that makes sure the schema exists before a step uses it."""

    def setup_for_execution(self, context: InitResourceContext) -> None:
        super().setup_for_execution(context)
        with self.get_connection() as con:
            create_schema(con)


class WarehouseIOManager(DuckDBPolarsIOManager):
    """`DuckDBPolarsIOManager` that makes sure the schema exists before it writes an output."""

    def create_io_manager(self, context):
        import duckdb

        con = duckdb.connect(self.database)
        try:
            create_schema(con)
        finally:
            con.close()
        return super().create_io_manager(context)
