"""Scores of a reward model on preference pairs: pairwise accuracy with its uncertainty, and
RewardBench-style subset and section scores (map and weights in data/rewardbench_sections.yaml)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import yaml


@dataclass(frozen=True)
class Accuracy:
    n: int
    correct: int
    ties: int  # equal rewards: counted as not correct, and reported
    low: float  # 95% Wilson score interval
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return {"accuracy": round(self.value, 4), "n": self.n, "ties": self.ties,
                "ci95": [round(self.low, 4), round(self.high, 4)]}


def pairwise_accuracy(scores: list[tuple[float, float]]) -> Accuracy:
    """Share of pairs whose chosen side gets the higher reward, with a 95% Wilson interval."""
    n = len(scores)
    correct = sum(c > r for c, r in scores)
    ties = sum(c == r for c, r in scores)
    low, high = wilson(correct, n)
    return Accuracy(n, correct, ties, low, high)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@cache
def rewardbench_spec() -> dict:
    return yaml.safe_load((files("music_assets") / "data" / "rewardbench_sections.yaml").read_text())


def section_of(subset: str) -> str | None:
    for section, subsets in rewardbench_spec()["sections"].items():
        if subset in subsets:
            return section
    return None


def rewardbench_scores(correct_by_subset: dict[str, tuple[int, int]]) -> dict:
    """{subset: (correct, n)} -> subset accuracies, section scores and their average, weighted as
    RewardBench's calculate_scores_per_section weights them (EXAMPLE_COUNTS from the spec). A subset
    RewardBench does not define keeps its own accuracy under `subsets`, is listed with its pair
    count under `unknown_subsets`, and counts in no section."""
    spec = rewardbench_spec()
    counts = spec["example_counts"]
    subsets = {s: c / n for s, (c, n) in correct_by_subset.items() if n}
    sections: dict[str, float] = {}
    weighted = defaultdict(float)
    weight = defaultdict(float)
    unknown = {}
    for subset, acc in subsets.items():
        section = section_of(subset)
        if section is None:
            unknown[subset] = correct_by_subset[subset][1]
            continue
        weighted[section] += acc * counts[subset]
        weight[section] += counts[subset]
    for section in spec["sections"]:
        if weight[section]:
            sections[section] = weighted[section] / weight[section]
    average = sum(sections.values()) / len(sections) if sections else float("nan")
    return {"subsets": subsets, "sections": sections, "average": average,
            "sections_missing": [s for s in spec["sections"] if s not in sections], "unknown_subsets": unknown}


@dataclass(frozen=True)
class WinRate:
    """Head-to-head outcomes of one model against another over n contexts: win rate counts a tie
    as half a win (MT-Bench's convention); the 95% interval is a percentile bootstrap over contexts."""

    n: int
    wins: int
    ties: int
    losses: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return {"n": self.n, "wins": self.wins, "ties": self.ties, "losses": self.losses,
                "win_rate": round(self.value, 4), "ci95": [round(self.low, 4), round(self.high, 4)]}


def win_rate(outcomes: list[str], samples: int = 2000, seed: int = 0) -> WinRate:
    """outcomes: 'win' | 'tie' | 'loss' per context, from the first model's side."""
    import numpy as np

    unknown = set(outcomes) - {"win", "tie", "loss"}
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}; expected win, tie or loss")
    points = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes])
    n = len(points)
    if n == 0:
        return WinRate(0, 0, 0, 0, float("nan"), float("nan"))
    means = points[np.random.default_rng(seed).integers(0, n, size=(samples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return WinRate(n, outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss"), float(low), float(high))
