-- The warehouse tables that exist (a checkpoint's lineage may predate some, e.g. no simulation ran).
SELECT table_name FROM information_schema.tables
WHERE table_schema = 'music';
