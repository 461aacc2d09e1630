"""Best-of-N bookkeeping against hand-computed values: judge verdict parsing, the order-swap
consistency rule, bootstrap win rates, the per-N summary, and where Best-of-N contexts start."""

import pytest

from music_assets.evaluation.best_of_n import EvalContext
from music_assets.evaluation.best_of_n_assets import bon_summary, eval_contexts, sample_ids
from music_assets.evaluation.judge import combine, judge_prompt, parse_verdict
from music_assets.evaluation.scoring import win_rate
from music_assets.common.tables import frame


def test_parse_verdict_takes_the_last_bracketed_verdict_and_reports_none():
    assert parse_verdict("B is clearer.\n[[B]]") == "B"
    assert parse_verdict("The format is [[A]], [[B]] or [[C]]. Both are fine.\nVerdict: [[C]]") == "C"
    assert parse_verdict("[[ A ]]") == "A"
    assert parse_verdict("Conversation A is better.") is None  # no bracketed verdict: a parse failure
    assert parse_verdict("") is None and parse_verdict(None) is None


def test_order_swapped_verdicts_count_only_when_consistent():
    # forward shows (first, second) as (A, B); swapped shows (second, first) as (A, B)
    assert combine("A", "B") == ("first", "consistent")
    assert combine("B", "A") == ("second", "consistent")
    assert combine("A", "A") == ("tie", "inconsistent")  # position bias: it always picked A
    assert combine("C", "C") == ("tie", "judge_tie")
    assert combine("A", "C") == ("tie", "inconsistent")
    assert combine(None, "B") == ("tie", "unparsed")


def test_judge_prompt_shows_both_conversations_and_the_verdict_format():
    text = judge_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}])[0]["content"]
    assert text.index("Hello!") < text.index("[End of conversation A]") < text.index("Go away.")
    assert "[[A]]" in text and "[[C]]" in text and "{conversation_a}" not in text


def test_win_rate_counts_ties_as_half_and_bootstraps_over_contexts():
    wr = win_rate(["win", "win", "tie", "loss"], samples=4000, seed=1)
    assert (wr.n, wr.wins, wr.ties, wr.losses) == (4, 2, 1, 1) and wr.value == pytest.approx(0.625)
    assert 0 <= wr.low <= wr.value <= wr.high <= 1 and wr.high - wr.low > 0.3  # n = 4: a wide interval
    assert win_rate(["win"] * 5).as_dict()["ci95"] == [1.0, 1.0]
    assert win_rate(["win", "tie"], seed=3).as_dict() == win_rate(["win", "tie"], seed=3).as_dict()  # seeded
    with pytest.raises(ValueError, match="unknown outcomes"):
        win_rate(["draw"])


def test_summary_states_unparsed_judge_outputs_and_drops_per_n():
    row = {"run_key": "k", "source": "mt_bench", "raw_forward": "", "raw_swapped": "", "drop_reason": None}
    verdicts = frame("bon_judgments", [
        {**row, "context_id": "a", "n": 2, "outcome": "win", "reason": "consistent", "verdict_forward": "B", "verdict_swapped": "A"},
        {**row, "context_id": "b", "n": 2, "outcome": "tie", "reason": "unparsed", "verdict_forward": None, "verdict_swapped": "A"},
        {**row, "context_id": "c", "n": 2, "outcome": "tie", "reason": "identical", "verdict_forward": "C", "verdict_swapped": "C"},
        {**row, "context_id": "d", "n": 2, "outcome": None, "reason": None, "verdict_forward": None,
         "verdict_swapped": None, "drop_reason": "policy:empty"},
        {**row, "context_id": "a", "n": 4, "outcome": "loss", "reason": "consistent", "verdict_forward": "A", "verdict_swapped": "B"},
    ])
    s = bon_summary(verdicts, samples=500, seed=0)
    two = s["2"]
    assert (two["n"], two["wins"], two["ties"], two["losses"]) == (3, 1, 2, 0)
    assert two["win_rate"] == pytest.approx(2 / 3, abs=1e-4)
    # identical conversations are not sent to the judge: 2 judged contexts = 4 outputs, 1 unparsed
    assert (two["judge_outputs"], two["unparsed"], two["unparsed_share"]) == (4, 1, 0.25)
    assert two["dropped"] == {"policy:empty": 1} and two["reasons"]["identical"] == 1
    assert s["4"]["win_rate"] == 0.0 and s["4"]["n"] == 1


def test_best_of_n_contexts_start_at_a_user_request():
    held = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    rows = [{"source": "heldout_seed", "context_id": "hh/1", "messages": held},
            {"source": "mt_bench", "context_id": "mt_bench/1",
             "messages": [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]}]
    ctxs = {c.context_id: c for c in eval_contexts(rows, None, 0)}
    assert ctxs["hh/1"].messages == held[:-1] and ctxs["hh/1"].scripted_users == ()
    assert ctxs["mt_bench/1"].messages == [{"role": "user", "content": "first"}]
    assert ctxs["mt_bench/1"].scripted_users == ("second",)
    with pytest.raises(ValueError, match="must end with a user message"):
        EvalContext("x", "s", held)
    ids = [f"id{i}" for i in range(50)]
    assert sample_ids(ids, 5, 0) == sample_ids(list(reversed(ids)), 5, 0) and len(sample_ids(ids, 5, 0)) == 5
    assert sample_ids(ids, 5, 0) != sample_ids(ids, 5, 1)
