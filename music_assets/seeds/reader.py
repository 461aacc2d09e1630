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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def read_rows(path: Path) -> Iterator[RawRow]:
    path = Path(path)
    kind = container_of(path)
    if kind == "parquet":
        yield from _read_parquet(path)
        return
    text = read_bytes(path).decode("utf-8", errors="surrogateescape")
    if kind == "jsonl":
        yield from _read_jsonl(text)
    else:
        yield from _read_json(path, text)


def _read_jsonl(text: str) -> Iterator[RawRow]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield RawRow(number, record=json.loads(line), raw=_excerpt(line))
        except json.JSONDecodeError as exc:
            yield RawRow(number, error=f"malformed JSON: {exc.msg} at column {exc.colno}", raw=_excerpt(line))


def _read_json(path: Path, text: str) -> Iterator[RawRow]:
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
    for number, record in enumerate(data, start=1):
        yield RawRow(number, record=record, raw=_excerpt(json.dumps(record, ensure_ascii=False, default=str)))


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise SeedFileError(f"{path}: cannot read Parquet: {exc}") from exc
    for number, record in enumerate(table.to_pylist(), start=1):
        yield RawRow(number, record=record, raw=_excerpt(json.dumps(record, ensure_ascii=False, default=str)))


def read_hf_dataset(dataset_id: str, split: str, config_name: str | None = None) -> Iterator[RawRow]:
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
    for number, record in enumerate(ds, start=1):
        yield RawRow(number, record=record, raw=_excerpt(json.dumps(record, ensure_ascii=False, default=str)))


@dataclass(frozen=True)
class ResolvedSource:
    """A seed source resolved from the config: where its rows come from and in which format."""

    name: str
    location: str  # a file path or 'hf:<id>:<split>'
    format: str
    path: Path | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"

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
        if self.path is not None:
            return read_rows(self.path)
        return read_hf_dataset(self.hf_dataset, self.split, self.hf_config)

    def fingerprint(self) -> str:
        """sha256 of the file's bytes (the source's data version); for a dataset id, of the id."""
        if self.path is None:
            return hashlib.sha256(self.location.encode()).hexdigest()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
