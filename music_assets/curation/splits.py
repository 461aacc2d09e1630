"""Leak-free training splits: baseline D and augmented D + D_MUSIC, split by seed conversation.

A group (all pairs cut from one seed conversation: the seed pairs sharing its prefix and the MUSIC
pairs simulated from it) goes to one split, chosen by a hash of (seed, group id) rather than a
shuffle: the same group lands in the same split on every run and when more data arrives, so a
refresh never moves a test conversation into train.
"""

from __future__ import annotations

import hashlib

import polars as pl

SPLITS = ("train", "validation", "test")
VARIANTS = ("baseline", "music")


def unit_hash(seed: int, key: str) -> float:
    """A deterministic number in [0, 1) for (seed, key)."""
    return int(hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()[:13], 16) / 16**13


def assign_splits(pairs: pl.DataFrame, seed: int, validation: float, test: float) -> pl.DataFrame:
    """`pairs` with a `split` column: test if u < test, validation if u < test + validation, else
    train, where u = unit_hash(seed, group_id)."""
    if validation < 0 or test < 0 or validation + test >= 1:
        raise ValueError(f"validation ({validation}) and test ({test}) fractions must be >= 0 and sum to < 1")
    groups = pairs.select("group_id").unique()
    u = [unit_hash(seed, g) for g in groups["group_id"].to_list()]
    groups = groups.with_columns(u=pl.Series(u, dtype=pl.Float64)).with_columns(
        split=pl.when(pl.col("u") < test).then(pl.lit("test"))
        .when(pl.col("u") < test + validation).then(pl.lit("validation"))
        .otherwise(pl.lit("train"))
    )
    return pairs.join(groups.select("group_id", "split"), on="group_id", how="left")


def variants(pairs: pl.DataFrame, seed: int, music_ratio: float | None) -> pl.DataFrame:
    """Rows (variant, split, pair columns...): baseline = seed pairs; music = seed pairs plus MUSIC
    pairs, whose *train* share is capped at `music_ratio` x the seed train pairs (deterministic
    choice by hash). Validation and test keep every MUSIC pair: they measure multi-turn accuracy."""
    seed_pairs = pairs.filter(pl.col("origin") == "seed")
    music = pairs.filter(pl.col("origin") == "music")
    if music_ratio is not None:
        if music_ratio < 0:
            raise ValueError(f"music_ratio must be >= 0, got {music_ratio}")
        cap = int(round(music_ratio * seed_pairs.filter(pl.col("split") == "train").height))
        train = music.filter(pl.col("split") == "train")
        order = train.with_columns(u=pl.Series([unit_hash(seed + 1, p) for p in train["pair_id"].to_list()], dtype=pl.Float64))
        keep = order.sort("u").head(cap).drop("u")
        music = pl.concat([keep, music.filter(pl.col("split") != "train")])
    return pl.concat(
        [
            seed_pairs.with_columns(variant=pl.lit("baseline")),
            seed_pairs.with_columns(variant=pl.lit("music")),
            music.with_columns(variant=pl.lit("music")),
        ]
    )


def composition(rows: pl.DataFrame) -> dict:
    """Counts per variant x split x origin, per source, and the user-turn histogram."""
    out: dict = {}
    for variant in VARIANTS:
        part = rows.filter(pl.col("variant") == variant)
        out[variant] = {
            "per_split": {
                split: {o: part.filter((pl.col("split") == split) & (pl.col("origin") == o)).height for o in ("seed", "music")}
                for split in SPLITS
            },
            "per_source": dict(sorted(part.group_by("source").len().iter_rows())),
            "user_turns_histogram": {str(k): n for k, n in sorted(part.group_by("user_turns").len().iter_rows())},
        }
    return out
