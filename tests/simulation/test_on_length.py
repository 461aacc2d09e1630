"""What happens to a message cut at max_tokens (`simulation.on_length`), with a scripted engine
that cuts every first assistant answer: `continue` asks the engine to go on with the same message
(the cut text sent back as the final assistant message), `trim` keeps it up to its last complete
sentence, `retry` samples anew (and here drops the context). The real engines' side of
`continue` (vLLM's continue_final_message) is tested in tests/engines."""

import duckdb
import pytest

from music_assets.common.engines import Generation
from music_assets.common.generation import trim_to_sentence
from music_assets.common.tables import create_schema
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.driver import Engines
from music_assets.simulation.simulate import simulate
from resources.llm import LLMEngine
from tests.simulation.test_simulation_faults import USER_PROMPT, MemoryStore, contexts

HEAD, TAIL = "The first part is done. The second part goes", " on and ends here."
REQUESTS: list = []


class CuttingEngine(LLMEngine):
    """Assistant answers come out cut (`length`) unless continued; `always_cut` cuts those too."""

    model: str = "cutting"
    always_cut: bool = False

    def chat(self, conversations, sampling, seeds=None):
        out = []
        for conv in conversations:
            REQUESTS.append(conv)
            if conv[0]["content"].startswith(USER_PROMPT):
                out.append(Generation(["And what about the next step?"], ["stop"], 6))
            elif conv[-1]["role"] == "assistant":  # a continuation of the cut answer
                out.append(Generation([TAIL], ["length" if self.always_cut else "stop"], 4))
            elif conv[-1]["content"].startswith("Rewrite"):
                out.append(Generation(["A subtly different request about goats"], ["stop"], 6))
            else:
                out.append(Generation([HEAD], ["length"], 9))
        return out


@pytest.fixture(autouse=True)
def _reset():
    REQUESTS.clear()


def run(store, engine=None, **settings):
    engine = engine or CuttingEngine()
    return simulate(contexts(), Engines(engine, engine, engine), SimulationConfig(turns=2, contrast_turn=1, **settings),
                    store, log=lambda _: None)


def test_continue_finishes_the_cut_answer_in_the_same_message():
    store = MemoryStore()
    stats = run(store, on_length="continue")
    assert stats.completed == 5 and not stats.dropped
    answers = {r["assistant_message"] for r in store.rows}
    assert answers == {HEAD + TAIL}
    assert {r["assistant_finish"] for r in store.rows} == {"continued"}
    assert {r["user_finish"] for r in store.rows} == {"stop"}
    assert stats.continuations == len(store.rows) and stats.requests == len(REQUESTS)
    continued = [c for c in REQUESTS if c[-1]["role"] == "assistant"]
    assert continued and all(c[-1]["content"] == HEAD for c in continued)
    # the continuation extends the cut request: same conversation, the cut answer appended
    first_try = next(c for c in REQUESTS if c[-1]["role"] == "user" and not c[0]["content"].startswith(USER_PROMPT)
                     and not c[-1]["content"].startswith("Rewrite"))
    assert any(c[:-1] == first_try for c in continued)
    # tokens of both requests count for the kept answer
    assert {r["assistant_tokens"] for r in store.rows} == {9 + 4}
    assert {r["assistant_attempts"] for r in store.rows} == {1}


def test_continue_gives_up_after_max_continuations_and_retries_then_drops():
    store = MemoryStore()
    stats = run(store, engine=CuttingEngine(always_cut=True), on_length="continue", max_continuations=2,
                max_attempts=2)
    assert stats.completed == 0 and dict(stats.dropped) == {"truncated": 5}
    answer_requests = [c for c in REQUESTS if not c[0]["content"].startswith(USER_PROMPT)
                       and not c[-1]["content"].startswith("Rewrite")]
    # per context, turn 1: 2 attempts x (1 + 2 continuations) for the first branch to fail (both
    # branches are asked at c; the context drops at its first failure)
    assert len(answer_requests) == 5 * 2 * 2 * 3
    assert {d["last_output"] for d in store.drops} == {HEAD + TAIL + TAIL}


def test_trim_keeps_the_answer_up_to_its_last_complete_sentence():
    store = MemoryStore()
    stats = run(store, on_length="trim")
    assert stats.completed == 5 and stats.trimmed == len(store.rows)
    assert {r["assistant_message"] for r in store.rows} == {"The first part is done."}
    assert {r["assistant_finish"] for r in store.rows} == {"trimmed"}
    assert not any(c[-1]["role"] == "assistant" for c in REQUESTS)


def test_retry_drops_what_is_always_cut():
    store = MemoryStore()
    stats = run(store, on_length="retry")
    assert stats.completed == 0 and dict(stats.dropped) == {"truncated": 5}


@pytest.mark.parametrize("text, kept", [
    ("Mix the flour. Add the eggs. Then bake it for", "Mix the flour. Add the eggs."),
    ('He said "stop." Then he left and', 'He said "stop."'),
    ("Steps:\n1. Preheat the oven.\n2. Mix", "Steps:\n1. Preheat the oven."),
    ("Steps:\n1. Preheat\n2.", None),  # "1." and "2." open list items; no sentence ended
    ("Use this snippet to print things. ```python\nprint('done.')\nx = ", "Use this snippet to print things."),
    ("Short. " + "a very long sentence that is cut " * 10, None),  # would keep too little
    ("No sentence end at all", None),
])
def test_trim_to_sentence(text, kept):
    assert trim_to_sentence(text) == kept


def test_on_length_settings_are_checked_at_load():
    with pytest.raises(ValueError, match="on_length"):
        SimulationConfig(on_length="truncate")
    with pytest.raises(ValueError, match="max_continuations"):
        SimulationConfig(max_continuations=-1)
    with pytest.raises(ValueError, match="rewrite_context_chars"):
        SimulationConfig(rewrite_context_chars=-5)


def test_a_warehouse_from_before_on_length_gets_the_columns_and_keeps_its_turns(tmp_path):
    con = duckdb.connect(str(tmp_path / "old.duckdb"))
    con.execute("CREATE SCHEMA music; CREATE TABLE music.simulated_branches (turn_key VARCHAR PRIMARY KEY, "
                "assistant_message VARCHAR)")
    con.execute("INSERT INTO music.simulated_branches VALUES ('k1', 'an old answer')")
    create_schema(con)
    create_schema(con)  # idempotent
    assert con.execute("SELECT turn_key, assistant_message, user_finish, assistant_finish "
                       "FROM music.simulated_branches").fetchall() == [("k1", "an old answer", "stop", "stop")]
