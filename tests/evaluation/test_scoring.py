"""Accuracy with intervals and RewardBench-style section scores, against hand-computed values."""

import math

import pytest

from music_assets.evaluation.scoring import pairwise_accuracy, rewardbench_scores, rewardbench_spec, wilson


def test_pairwise_accuracy_counts_ties_and_gives_a_wilson_interval():
    acc = pairwise_accuracy([(1.0, 0.0)] * 7 + [(0.0, 1.0)] * 2 + [(0.5, 0.5)])
    assert (acc.n, acc.correct, acc.ties) == (10, 7, 1) and acc.value == 0.7
    # Wilson 95% for 7/10, computed by hand: centre 0.6305, half-width 0.2539
    assert acc.low == pytest.approx(0.3968, abs=1e-3) and acc.high == pytest.approx(0.8922, abs=1e-3)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_sections_weight_subsets_by_examples_and_math_as_much_as_all_code():
    code = ["hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]
    scores = rewardbench_scores({"math-prm": (0, 447), **{c: (164, 164) for c in code},
                                 "alpacaeval-easy": (100, 100), "mt-bench-easy": (0, 28)})
    assert scores["sections"]["Reasoning"] == pytest.approx(0.5)  # math 0, code 1, equal weight
    assert scores["sections"]["Chat"] == pytest.approx(100 / 128)  # 100 easy examples vs 28 mt-bench
    assert scores["average"] == pytest.approx((0.5 + 100 / 128) / 2)
    assert scores["sections_missing"] == ["Chat Hard", "Safety"]


def test_paper_reference_table_is_consistent():
    ref = rewardbench_spec()["paper_reference"]
    for row in ref.values():
        assert row["Average"] == pytest.approx(sum(row[s] for s in ("Chat", "Chat Hard", "Safety", "Reasoning")) / 4, abs=0.06)
