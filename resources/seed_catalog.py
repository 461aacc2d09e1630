"""Which seed sources exist and where their data lives.

Seed sources are dynamic partitions of the ingestion assets: the partition key is a short source
name (or, for a source configured with `shards: K`, one of its K shard keys
`<name>/shard-NNN-of-KKK`, see music_assets/seeds/shards.py), and this resource turns the key into
a location. Three kinds of location:
- `embedded`: the hand-written sample shipped inside the package (the demo's default partition);
- a local JSONL / JSON / Parquet file (optionally .gz), named in config or dropped into `seeds_dir`
  (the file's stem is its source name);
- a Hugging Face `datasets` id with a split, when the network allows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

from dagster import Config, ConfigurableResource
from pydantic import Field

from music_assets.seeds.formats import DEFAULT_MAX_MESSAGE_CHARS
from music_assets.seeds.reader import ResolvedSource
from music_assets.seeds.shards import MAX_SHARDS, partition_keys, registered_shard_conflict, split_partition_key

EMBEDDED = "embedded"
EMBEDDED_PATH = Path(str(files("music_assets") / "data" / "embedded_seeds.jsonl"))
SEED_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet")

# Partition keys end up inside SQL predicates written by the IO manager and in file names:
# keep them to a safe alphabet. No '/': it separates a source name from its shard in a partition key.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def validate_source_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"invalid seed source name {name!r}: use 1-64 lowercase letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return name


def source_name_for_file(path: Path) -> str:
    """The source name a file in `seeds_dir` gets: its lowercased stem, unsafe characters as '_'."""
    stem = path.name
    for suffix in sorted(SEED_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return validate_source_name(re.sub(r"[^a-z0-9_.-]+", "_", stem.lower()).strip("_.-")[:64] or "seed")


class SeedSourceConfig(Config):
    """One configured source: exactly one of `path` or `hf_dataset`."""

    path: str | None = Field(None, description="a JSONL / JSON / Parquet file, optionally .gz")
    hf_dataset: str | None = Field(None, description="a Hugging Face datasets id (needs the network)")
    hf_config: str | None = Field(None, description="the dataset's configuration name, if it has several")
    split: str = Field("train", description="the dataset split")
    format: str = Field("auto", description="auto, conversational, prompt_chosen_rejected, hh_rlhf, llmbar, prompts, ...")
    shards: int = Field(1, ge=1, le=MAX_SHARDS,
                        description="split the source into this many partitions (by a hash of the pair id) that "
                                    "run side by side; fixed once the source has partitions")


class SeedCatalog(ConfigurableResource):
    """Maps seed partition keys (source names, or shards of a sharded source) to their data."""

    sources: dict[str, SeedSourceConfig] = Field({}, description="configured sources by name (YAML: seed_sources)")
    seeds_dir: str | None = Field(None, description="a folder whose seed files are sources named after them")
    max_message_chars: int = Field(DEFAULT_MAX_MESSAGE_CHARS,
                                   description="a longer message is absurdly long: its row is quarantined")
    max_quarantine_share: float = Field(
        0.05, description="the blocking check on seed_conversations fails above this quarantined share of a source")

    def names(self) -> list[str]:
        """Every source this catalog knows: embedded, configured ones and files in `seeds_dir`."""
        names = {EMBEDDED, *self.sources}
        names.update(source_name_for_file(p) for p in self.seed_files())
        return sorted(names)

    def seed_files(self) -> list[Path]:
        if not self.seeds_dir or not Path(self.seeds_dir).is_dir():
            return []
        return sorted(
            p for p in Path(self.seeds_dir).iterdir() if p.is_file() and p.name.lower().endswith(SEED_SUFFIXES)
        )

    def shard_count(self, name: str) -> int:
        """A source's configured shards (files in seeds_dir and the embedded sample: 1)."""
        return self.sources[name].shards if name in self.sources else 1

    def partition_keys(self, name: str | None = None) -> list[str]:
        """The partition keys of one source, or of every source the catalog knows."""
        names = self.names() if name is None else [name]
        return [key for n in names for key in partition_keys(n, self.shard_count(n))]

    def shard_conflicts(self, registered: Iterable[str]) -> dict[str, str]:
        """Sources whose registered partitions were made with another shard count than configured,
        each with why that is refused (see `registered_shard_conflict`)."""
        registered = list(registered)
        conflicts = {n: registered_shard_conflict(n, self.shard_count(n), registered) for n in self.names()}
        return {n: why for n, why in conflicts.items() if why}

    def resolve(self, key: str) -> ResolvedSource:
        """The source, or the shard of it, that a partition key names. A key made for another shard
        count than the configured one is refused: it would ingest rows another partition holds."""
        name, shard = split_partition_key(key)
        source = self.source(name)
        conflict = registered_shard_conflict(name, self.shard_count(name), [key])
        if conflict:
            raise ValueError(f"seed partition {key!r}: {conflict}")
        return source.of_shard(shard)

    def source(self, name: str) -> ResolvedSource:
        """A source by name, whole (all its shards): what its file is and its fingerprint."""
        if name in self.sources:
            cfg = self.sources[name]
            return ResolvedSource.of(name, cfg.format, cfg.path, cfg.hf_dataset,
                                     cfg.hf_config, cfg.split)
        if name == EMBEDDED:
            return ResolvedSource(name, str(EMBEDDED_PATH), "conversational", path=EMBEDDED_PATH)
        for path in self.seed_files():
            if source_name_for_file(path) == name:
                return ResolvedSource(name, str(path), "auto", path=path)
        raise KeyError(
            f"unknown seed source {name!r}: not configured under `seed_sources`, not 'embedded', "
            f"and no matching file in seeds_dir={self.seeds_dir!r}"
        )
