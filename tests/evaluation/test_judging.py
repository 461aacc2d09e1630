"""Best-of-N bookkeeping against hand-computed values: judge verdict parsing, the order-swap
consistency rule, bootstrap win rates, the per-N summary and report (judge errors apart from ties),
judge agreement, and where Best-of-N contexts start."""

import duckdb
import polars as pl
import pytest

from music_assets.evaluation.assets import best_of_n_section
from music_assets.evaluation.best_of_n import EvalContext
from music_assets.evaluation.best_of_n_assets import bon_summary, eval_contexts, sample_ids
from music_assets.evaluation.judge import combine, judge_prompt, parse_verdict
from music_assets.evaluation.scoring import win_rate
from music_assets.common.tables import create_schema, frame, sql


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
    assert combine(None, "B") == (None, "unparsed")  # no verdict: a judge error, not a tie


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


def _verdicts():
    row = {"run_key": "k", "source": "mt_bench", "raw_forward": "", "raw_swapped": "", "drop_reason": None}
    return frame("bon_judgments", [
        {**row, "context_id": "a", "n": 2, "outcome": "win", "reason": "consistent", "verdict_forward": "B", "verdict_swapped": "A"},
        {**row, "context_id": "b", "n": 2, "outcome": None, "reason": "unparsed", "verdict_forward": None, "verdict_swapped": "A"},
        {**row, "context_id": "c", "n": 2, "outcome": "tie", "reason": "identical", "verdict_forward": "C", "verdict_swapped": "C"},
        {**row, "context_id": "d", "n": 2, "outcome": None, "reason": None, "verdict_forward": None,
         "verdict_swapped": None, "drop_reason": "policy:empty"},
        {**row, "context_id": "e", "n": 2, "outcome": None, "reason": "judge_truncated", "verdict_forward": None,
         "verdict_swapped": "B"},
        {**row, "context_id": "f", "n": 2, "outcome": None, "reason": "judge_error", "verdict_forward": None,
         "verdict_swapped": None, "raw_forward": "prompt of 5000 tokens exceeds max_model_len 4096"},
        {**row, "context_id": "g", "n": 2, "outcome": "tie", "reason": "judge_tie", "verdict_forward": "C", "verdict_swapped": "C"},
        {**row, "context_id": "a", "n": 4, "outcome": "loss", "reason": "consistent", "verdict_forward": "A", "verdict_swapped": "B"},
    ])


def test_summary_counts_judge_errors_apart_from_ties_and_out_of_the_win_rate():
    s = bon_summary(_verdicts(), samples=500, seed=0)
    two = s["2"]
    # decided: a (win), c (identical: a tie), g (judge tie); errors: b, e, f; d was dropped
    assert (two["n"], two["wins"], two["ties"], two["losses"]) == (3, 1, 2, 0)
    assert two["win_rate"] == pytest.approx(2 / 3, abs=1e-4)  # (1 + 2/2) / 3: the three errors are not ties
    assert two["judge_errors"] == {"judge_error": 1, "judge_truncated": 1, "unparsed": 1} and two["errors"] == 3
    assert (two["asked"], two["error_share"]) == (5, 0.6)  # identical conversations are not sent to the judge
    assert two["dropped"] == {"policy:empty": 1} and two["reasons"]["identical"] == 1
    assert s["4"]["win_rate"] == 0.0 and s["4"]["n"] == 1 and s["4"]["errors"] == 0


def test_the_report_shows_errors_by_reason_beside_wins_ties_and_losses(tmp_path):
    agreement = pl.DataFrame(schema={"variant": pl.String, "eval_set": pl.String, "n": pl.Int64, "agree": pl.Int64,
                                     "judge_prefers_chosen": pl.Int64})
    text, _ = best_of_n_section(_verdicts(), agreement, {"consistent": 2, "judge_truncated": 5, "judge_error": 1},
                                tmp_path, samples=200, seed=0)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| 2 ") or line.startswith("| 4 ")}
    n, wins, ties, losses, rate, errors = rows["2"][:6]
    assert (n, wins, ties, losses) == ("3", "1", "2", "0") and rate.startswith("0.667")
    assert errors == "3 of 5 (60%): 1 / 1 / 1"  # refused / cut / unparsed
    assert "refused / cut / unparsed" in text and "**The judge could not judge" not in text  # 3 of 6: not most
    assert "could not judge 6 of them (judge_error: 1, judge_truncated: 5, unparsed: 0)" in text


def test_judge_agreement_leaves_out_the_pairs_the_judge_could_not_judge():
    con = duckdb.connect()
    create_schema(con)
    con.execute("INSERT INTO music.rm_scores VALUES ('music', 'ck', 'rb', 'i1', NULL, 1, 2.0, 1.0, 'full'), "
                "('music', 'ck', 'rb', 'i2', NULL, 1, 2.0, 1.0, 'full'), ('music', 'ck', 'rb', 'i3', NULL, 1, 2.0, 1.0, 'full')")
    con.execute("INSERT INTO music.judge_verdicts VALUES ('rb', 'i1', 'chosen', 'consistent', 'A', 'B', '', ''), "
                "('rb', 'i2', NULL, 'judge_truncated', NULL, 'B', '', ''), ('rb', 'i3', 'tie', 'judge_tie', 'C', 'C', '', '')")
    assert con.execute(sql("evaluation/judge_agreement")).fetchall() == [("music", "rb", 1, 1, 1)]


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


def test_a_warehouse_from_before_judge_errors_accepts_them(tmp_path):
    """judge_verdicts.preferred was NOT NULL; a judge error stores NULL there. An existing
    warehouse is altered when the schema is created, its rows kept."""
    import duckdb

    from music_assets.common.tables import create_schema

    con = duckdb.connect(str(tmp_path / "old.duckdb"))
    con.execute("CREATE SCHEMA music; CREATE TABLE music.judge_verdicts (eval_set VARCHAR NOT NULL, "
                "item_id VARCHAR NOT NULL, preferred VARCHAR NOT NULL, reason VARCHAR NOT NULL)")
    con.execute("INSERT INTO music.judge_verdicts VALUES ('s', 'i1', 'chosen', 'consistent')")
    create_schema(con)
    con.execute("INSERT INTO music.judge_verdicts (eval_set, item_id, preferred, reason) VALUES ('s', 'i2', NULL, 'unparsed')")
    assert con.execute("SELECT item_id, preferred FROM music.judge_verdicts ORDER BY 1").fetchall() == [
        ("i1", "chosen"), ("i2", None)]
