"""Reads raw rows out of a seed file, one `RawRow` per record, without judging them.

Why a separate reader: a malformed line must become a quarantine row with its line number, not an
exception that loses the rest of the file. So reading never raises for a bad *record*; it raises
`SeedFileError` (naming the file) only when the file as a whole cannot be read.

Bytes are decoded with `surrogateescape`, so invalid UTF-8 survives decoding as lone surrogates
that the normalizer can detect per row (and quarantine) instead of failing the whole file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from music_assets.seeds.shards import Shard

# Which row numbers to yield (a shard's rows); None: every row. Readers apply it as early as their
# container allows, so a shard does not decode or parse the other shards' records where it can avoid it.
RowFilter = Callable[[int], bool] | None


class SeedFileError(Exception):
    """The file cannot be read at all (missing, unreadable, not the container format it claims)."""


@dataclass(frozen=True)
class RawRow:
    row_number: int  # 1-based: the line of a JSONL file, the position in a JSON list or Parquet file
    record: Any = None  # the decoded JSON value (normally a dict), None when `error` is set
    error: str | None = None  # why the record could not be decoded
    raw: str = ""  # an excerpt of the original text, kept for the quarantine table


RAW_EXCERPT_CHARS = 500


def _excerpt(text: str) -> str:
    return text[:RAW_EXCERPT_CHARS]


def container_of(path: Path) -> str:
    """The container format from the file name: jsonl, json or parquet (a .gz suffix is allowed)."""
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    raise SeedFileError(f"{path}: unknown file type (expected .jsonl, .json or .parquet, optionally .gz)")


def read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.lower().endswith(".gz") else data
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise SeedFileError(f"{path}: cannot read file: {exc}") from exc


def read_rows(path: Path, keep: RowFilter = None) -> Iterator[RawRow]:
    path = Path(path)
    kind = container_of(path)
    if kind == "parquet":
        yield from _read_parquet(path, keep)
        return
    text = read_bytes(path).decode("utf-8", errors="surrogateescape")
    if kind == "jsonl":
        yield from _read_jsonl(text, keep)
    else:
        yield from _read_json(path, text, keep)


def _read_jsonl(text: str, keep: RowFilter) -> Iterator[RawRow]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or (keep is not None and not keep(number)):  # before json.loads: the main cost
            continue
        try:
            yield RawRow(number, record=json.loads(line), raw=_excerpt(line))
        except json.JSONDecodeError as exc:
            yield RawRow(number, error=f"malformed JSON: {exc.msg} at column {exc.colno}", raw=_excerpt(line))


def _read_json(path: Path, text: str, keep: RowFilter) -> Iterator[RawRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SeedFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); use .jsonl for one record per line") from exc
    if isinstance(data, dict):
        # Accept {"data": [...]}-style wrappers with exactly one list value.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SeedFileError(f"{path}: a JSON file must hold a list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise SeedFileError(f"{path}: a JSON file must hold a list of records, found {type(data).__name__}")
    yield from _records(enumerate(data, start=1), keep)


def _records(numbered, keep: RowFilter) -> Iterator[RawRow]:
    for number, record in numbered:
        if keep is None or keep(number):
            yield RawRow(number, record=record, raw=_excerpt(json.dumps(record, ensure_ascii=False, default=str)))


def _read_parquet(path: Path, keep: RowFilter) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise SeedFileError(f"{path}: cannot read Parquet: {exc}") from exc
    numbers = [n for n in range(1, table.num_rows + 1) if keep is None or keep(n)]
    if len(numbers) < table.num_rows:  # convert only this shard's rows to Python objects
        table = table.take([n - 1 for n in numbers])
    yield from _records(zip(numbers, table.to_pylist()), None)


def read_hf_dataset(dataset_id: str, split: str, config_name: str | None = None,
                    keep: RowFilter = None) -> Iterator[RawRow]:
    """Rows of a Hugging Face `datasets` dataset (needs the optional `datasets` package and network,
    or a local dataset folder)."""
    try:
        import datasets
    except ImportError as exc:
        raise SeedFileError(
            f"hf:{dataset_id}: the `datasets` package is not installed (pip install 'music-assets[hf]')"
        ) from exc
    try:
        ds = datasets.load_dataset(dataset_id, config_name, split=split)
    except Exception as exc:  # network, missing split, unknown id: all mean "cannot read the source"
        raise SeedFileError(f"hf:{dataset_id} (split {split}): cannot load: {exc}") from exc
    if keep is not None:  # select by index: the other shards' rows are never decoded
        numbers = [n for n in range(1, len(ds) + 1) if keep(n)]
        yield from _records(zip(numbers, ds.select([n - 1 for n in numbers])), None)
        return
    yield from _records(enumerate(ds, start=1), None)


@dataclass(frozen=True)
class ResolvedSource:
    """A seed source resolved from the config: where its rows come from and in which format; with
    `shard`, one shard of it (see `music_assets/seeds/shards.py`)."""

    name: str
    location: str  # a file path or 'hf:<id>:<split>'
    format: str
    path: Path | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"
    shard: Shard | None = None

    @property
    def partition_key(self) -> str:
        """The seed partition this source (or shard) is: what the tables' `source` column holds."""
        return self.name if self.shard is None else self.shard.key(self.name)

    def of_shard(self, shard: Shard | None) -> ResolvedSource:
        return replace(self, shard=shard)

    @classmethod
    def of(cls, name: str, fmt: str, path: str | None = None, hf_dataset: str | None = None,
           hf_config: str | None = None, split: str = "train") -> ResolvedSource:
        """The source a config entry names: exactly one of a file `path` or an `hf_dataset` id."""
        if bool(path) == bool(hf_dataset):
            raise ValueError(f"source {name!r}: set exactly one of `path` or `hf_dataset`")
        if path:
            file = Path(path).expanduser()
            return cls(name, str(file), fmt, path=file)
        return cls(name, f"hf:{hf_dataset}:{split}", fmt, None, hf_dataset, hf_config, split)

    def rows(self) -> Iterator[RawRow]:
        """The source's rows; a shard's only, though every shard reads the whole file (see the docs)."""
        keep = None if self.shard is None else self.shard.row_filter(self.name)
        if self.path is not None:
            return read_rows(self.path, keep)
        return read_hf_dataset(self.hf_dataset, self.split, self.hf_config, keep)

    def fingerprint(self) -> str:
        """sha256 of the file's bytes (the source's data version); for a dataset id, of the id. The
        same for every shard: a shard records the version of the file it was cut from."""
        if self.path is None:
            return hashlib.sha256(self.location.encode()).hexdigest()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
