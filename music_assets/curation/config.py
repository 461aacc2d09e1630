"""The curation stage's settings (YAML sections `data:` and `eval_sets:`): evaluation sets kept
out of training, near-duplicate removal, the train/validation/test splits and the exports.
`eval_items`, `deduplicated_pairs` and `training_splits` read this one object; so does
`deduplicate()`."""

from __future__ import annotations

from dataclasses import dataclass

from music_assets.common.config import setting
from music_assets.curation.minhash import ShingleConfig
from music_assets.seeds.reader import ResolvedSource


@dataclass(frozen=True)
class EvalSet:
    """A registered evaluation set, read like a seed source from exactly one of a file (`path`) or
    a Hugging Face dataset (`hf_dataset`, `hf_config`, `split`); its items are kept out of every
    training split. RewardBench itself: `{hf_dataset: allenai/reward-bench, split: filtered,
    rewardbench: true}`, or a local Parquet / JSONL copy of it."""

    path: str | None = setting(None, help="the file (JSONL / JSON / Parquet, optionally .gz)", path=True)
    hf_dataset: str | None = setting(None, help="a Hugging Face datasets id (needs the network), instead of `path`")
    hf_config: str | None = setting(None, help="the dataset's configuration name, if it has several")
    split: str = setting("train", help="the dataset split (RewardBench: filtered)")
    format: str = setting("auto", help="as for seed sources: conversational, prompt_chosen_rejected, llmbar, prompts, ...")
    rewardbench: bool = setting(
        False, help="RewardBench-format rows (a `subset` per row), scored per subset and section")

    def __post_init__(self):
        if bool(self.path) == bool(self.hf_dataset):
            raise ValueError("set exactly one of `path` or `hf_dataset`")

    def source(self, name: str) -> ResolvedSource:
        """Where this set's rows come from, as a seed source's would."""
        return ResolvedSource.of(name, self.format, self.path, self.hf_dataset, self.hf_config, self.split)


@dataclass(frozen=True)
class CurationConfig:
    eval_sets: dict[str, EvalSet] = setting(
        factory=dict, help="evaluation sets by name (YAML: the top-level `eval_sets:` section)")
    # dedup
    near_duplicate_threshold: float = setting(0.8, help="word-shingle Jaccard above which two pairs are near-duplicates")
    eval_leak_threshold: float = setting(
        0.8, help="share of an eval message's shingles inside one training message that counts as a leak")
    shingle_words: int = setting(5, help="words per shingle (a shorter text is one shingle)")
    minhash_bins: int = setting(128, help="MinHash signature length: a power of two between 8 and 1024")
    lsh_bands: int = setting(32, help="LSH bands (bins = bands x rows); more bands find lower similarities")
    dedup_chunk_pairs: int = setting(20_000, help="pairs per streaming dedup chunk: bounds memory, not results")
    # splits: by group (seed conversation), assigned by a hash of (split_seed, group), so adding
    # data never moves an existing group to another split
    split_seed: int = setting(0, help="seeds the hash that assigns each seed conversation to a split")
    validation_fraction: float = setting(0.1, help="share of seed conversations in validation")
    test_fraction: float = setting(0.1, help="share of seed conversations in test")
    music_ratio: float | None = setting(
        None, help="MUSIC train pairs per seed train pair in the music variant (paper: ~0.42); None: all")
    exports_dir: str | None = setting(None, help="where the split files are written; None: <home>/exports", path=True)

    def __post_init__(self):
        for name in ("near_duplicate_threshold", "eval_leak_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"data.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.validation_fraction < 0 or self.test_fraction < 0 or self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("data: validation_fraction and test_fraction must be >= 0 and sum to less than 1")
        self.shingles()  # refuses bins/bands/words that MinHash cannot use, at load

    def shingles(self) -> ShingleConfig:
        """The MinHash parameters these settings give."""
        return ShingleConfig(words=self.shingle_words, bins=self.minhash_bins, bands=self.lsh_bands)
