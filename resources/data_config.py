"""Settings of the data-preparation assets (evaluation sets, dedup, splits, exports), as one
resource so the YAML config (sections `eval_sets:` and `data:`) sets them in one place."""

from __future__ import annotations


from dagster import Config, ConfigurableResource

from music_assets.curation.dedup import DedupConfig
from music_assets.curation.minhash import ShingleConfig


class EvalSetConfig(Config):
    """A registered evaluation file: its items are kept out of every training split."""

    path: str
    format: str = "auto"  # as for seed sources: conversational, prompt_chosen_rejected, llmbar, prompts, ...
    # RewardBench-format rows (`subset` per row): scored per subset and section; a row whose
    # subset is not in data/rewardbench_sections.yaml is skipped and counted
    rewardbench: bool = False


class DataConfig(ConfigurableResource):
    eval_sets: dict[str, EvalSetConfig] = {}
    # dedup
    near_duplicate_threshold: float = 0.8  # word-shingle Jaccard
    eval_leak_threshold: float = 0.8  # share of an eval message's shingles inside one training message
    shingle_words: int = 5
    minhash_bins: int = 128
    lsh_bands: int = 32
    # splits: by group (seed conversation), assigned by a hash of (split_seed, group), so adding
    # data never moves an existing group to another split
    split_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # MUSIC train pairs per seed train pair in the augmented set (the paper: ~31k / 73k = 0.42);
    # None uses every MUSIC pair
    music_ratio: float | None = None
    exports_dir: str = ".music/exports"

    def dedup(self) -> DedupConfig:
        return DedupConfig(
            threshold=self.near_duplicate_threshold,
            eval_threshold=self.eval_leak_threshold,
            shingles=ShingleConfig(words=self.shingle_words, bins=self.minhash_bins, bands=self.lsh_bands),
        )
