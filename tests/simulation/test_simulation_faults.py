"""The simulation loop's handling of bad model output and of crashes, with injected faults.

A scripted engine stands in for the LLM *only* to inject faults deterministically (empty output,
cut output, a user simulator writing as the assistant, a rewrite that changes nothing, a crash
between commits). Real vLLM runs the same loop in test_simulation_vllm.py.
"""

import pytest

from music_assets.common.engines import Generation
from music_assets.simulation.pairs import assemble_pairs, assistant_turns_differing
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.driver import Engines
from music_assets.simulation.simulate import simulate
from music_assets.simulation.state import Context, TurnStore
from music_assets.simulation.validators import word_jaccard
from resources.llm import LLMEngine

from music_assets.simulation.prompts import PACKAGED

# how the scripted engine tells the stages apart: the user simulator's instructions are its system message
USER_PROMPT, REWRITE_PROMPT = PACKAGED.render("user_simulator")[:60], PACKAGED.templates["contrastive_rewrite"][:40]


class ScriptedEngine(LLMEngine):
    """Answers by stage; `faults` maps (stage, context marker) to a list of outputs per attempt."""

    model: str = "scripted"
    faults: dict = {}

    def chat(self, conversations, sampling, seeds=None):
        out = []
        BATCHES.append([])
        for conv, seed in zip(conversations, seeds):
            text = "\n".join(m["content"] for m in conv)
            stage = ("user" if conv[0]["content"].startswith(USER_PROMPT)
                     else "rewrite" if conv[-1]["content"].startswith(REWRITE_PROMPT) else "assistant")
            marker = next((m for m in ("ctx-a", "ctx-b", "ctx-c", "ctx-d", "ctx-e") if m in text), "")
            CALLS.append((stage, marker))
            BATCHES[-1].append((stage, marker))
            script = self.faults.get(f"{stage}:{marker}")
            attempt = sum(1 for c in CALLS if c == (stage, marker)) - 1
            if script:
                value, finish = script[min(attempt, len(script) - 1)]
            else:
                value, finish = self._normal(stage, conv, seed), "stop"
            out.append(Generation([value], [finish], completion_tokens=len(value.split())))
        return out

    @staticmethod
    def _normal(stage, conv, seed):
        if stage == "user":
            return f"Follow-up question number {seed % 1000} about that?"
        if stage == "rewrite":
            return "A subtly different request about goats instead"
        return f"Here is a careful answer ({seed % 997}) to: {conv[-1]['content'][:40]}"


CALLS: list = []
BATCHES: list = []  # the (stage, marker) of every request, per engine call


class MemoryStore(TurnStore):
    def __init__(self, crash_after_commits=None):
        self.rows, self.drops, self.commits, self.crash_after = [], [], 0, crash_after_commits

    def load(self):
        return list(self.rows), list(self.drops)

    def commit(self, rows, drops):
        keys = {r["turn_key"] for r in self.rows}
        self.rows += [r for r in rows if r["turn_key"] not in keys]
        self.drops += drops
        self.commits += 1
        if self.crash_after is not None and self.commits >= self.crash_after:
            raise KeyboardInterrupt("injected crash after commit")


def contexts():
    return [
        Context(f"ctx-{x}", "test", [{"role": "user", "content": f"Seed question for ctx-{x}"},
                                     {"role": "assistant", "content": "Seed answer."}])
        for x in "abcde"
    ]


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()
    BATCHES.clear()


THREE_TURNS = SimulationConfig(turns=3, contrast_turn=1)


def run(engine, store, settings=THREE_TURNS):
    return simulate(contexts(), Engines(engine, engine, engine), settings, store, log=lambda _: None)


def test_bad_outputs_are_retried_or_dropped_with_reasons():
    engine = ScriptedEngine(faults={
        "user:ctx-a": [("", "stop"), ("Could you say more?", "stop")],  # empty once, then fine
        "user:ctx-b": [("Assistant: Sure, here is the answer.", "stop")],  # always answers as assistant
        "rewrite:ctx-c": [("Seed question for ctx-c", "stop")],  # unchanged (after its user turn)
        "assistant:ctx-d": [("This answer is cut off mid", "length")],  # always truncated
    })
    # the rewrite's input is the simulated user message, which never contains the marker; script
    # ctx-c's user message to carry it
    engine.faults["user:ctx-c"] = [("Seed question for ctx-c", "stop")]
    store = MemoryStore()
    stats = run(engine, store)

    assert stats.retries["empty"] == 1
    assert dict(stats.dropped) == {"user_answered_as_assistant": 1, "rewrite_unchanged": 1, "truncated": 1}
    assert {d["context_id"]: d["reason"] for d in store.drops} == {
        "ctx-b": "user_answered_as_assistant", "ctx-c": "rewrite_unchanged", "ctx-d": "truncated"}
    assert all(d["last_output"] for d in store.drops)
    assert stats.completed == 2
    pairs = assemble_pairs([{"context_id": c.context_id, "source": "test", "pair_id": c.context_id, "k": 1,
                             "messages": c.messages} for c in contexts()],
                           [{**r, "generation_key": "g", "prompt_version": "p", "models": "{}", "settings": "{}"}
                            for r in store.rows], turns=3)
    assert sorted(p["context_id"] for p in pairs) == ["ctx-a", "ctx-e"]
    for p in pairs:
        assert assistant_turns_differing(p) == 3
        assert p["modified_instruction"] == "A subtly different request about goats instead"
        # the visible rejected transcript keeps the original request
        assert p["rejected"][p["prefix_messages"] - 1]["content"] == p["original_instruction"]


def test_each_step_is_one_batched_call_per_stage():
    store = MemoryStore()
    stats = run(ScriptedEngine(), store, SimulationConfig(turns=3, contrast_turn=2))
    # turn 1: user + assistant; turn 2: user + rewrite + assistant; turn 3: user + assistant
    assert stats.calls == 7
    # 5 contexts: turn 1 shared (5+5), turn 2 shared user + 5 rewrites + 10 answers, turn 3 10 + 10
    assert stats.requests == 5 + 5 + 5 + 5 + 10 + 10 + 10
    assert stats.completed == 5 and len(store.rows) == 5 * (1 + 2 + 2)


def test_a_retry_rides_along_with_the_other_contexts_next_stage():
    engine = ScriptedEngine(faults={"user:ctx-a": [("", "stop"), ("Could you say more?", "stop")]})
    stats = run(engine, MemoryStore(), SimulationConfig(turns=3, contrast_turn=2))
    assert stats.completed == 5 and stats.retries["empty"] == 1
    retry_call = [b for b in BATCHES if ("user", "ctx-a") in b][1]  # [0]: the empty first attempt
    # not a call of its own: the other four contexts' turn-1 answers go in the same call
    assert sorted(retry_call) == [("assistant", m) for m in ("ctx-b", "ctx-c", "ctx-d", "ctx-e")] + [("user", "ctx-a")]
    # and ctx-a catches up one call later each stage, never running alone until its last answers
    assert all(len(b) > 2 for b in BATCHES[:-1])


def test_crash_then_resume_keeps_committed_turns_and_never_duplicates():
    store = MemoryStore(crash_after_commits=1)
    with pytest.raises(KeyboardInterrupt):
        run(ScriptedEngine(), store)
    first = {r["turn_key"]: r for r in store.rows}
    assert len(first) == 10  # turn 1 of 5 contexts, both branches (c = 1)

    store.crash_after = None
    CALLS.clear()
    stats = run(ScriptedEngine(), store)
    assert stats.resumed_turns == 10
    assert not any(stage == "rewrite" for stage, _ in CALLS)  # turn 1 (with the rewrites) is not redone
    keys = [r["turn_key"] for r in store.rows]
    assert len(keys) == len(set(keys)) == 30
    assert all(store.rows[i] == first[k] for i, k in enumerate(keys) if k in first)

    CALLS.clear()
    again = run(ScriptedEngine(), store)
    assert again.requests == 0 and not CALLS and again.completed == 5


def test_settings_validation():
    with pytest.raises(ValueError, match="fewer than 2 flawed turns"):
        SimulationConfig(turns=3, contrast_turn=3)
    sampled = {SimulationConfig(turns=5, min_contrast_turns=2).contrast_turn_for(f"c{i}") for i in range(200)}
    assert sampled == {1, 2, 3, 4}


def test_word_jaccard():
    assert word_jaccard("Braised pork belly recipe", "braised pork belly recipe!") == 1.0
    assert word_jaccard("braised pork belly", "twice-cooked pork") < 0.5


def test_simulated_user_may_not_repeat_the_private_rewrite():
    """After c, a rejected-branch user message containing the modified request would show the
    private instruction in the visible transcript: it is rejected (then retried or dropped)."""
    from music_assets.simulation.validators import user_validator

    check = user_validator([], private_rewrite=("How do I make twice-cooked pork?", "How do I make braised pork belly?"))
    assert check("Great, and how do I make Twice-Cooked pork? Quickly please.", "stop")[0] == "user_repeated_private_rewrite"
    assert check("Great, can I use less sugar?", "stop")[0] is None
    assert user_validator([])("How do I make twice-cooked pork?", "stop")[0] is None  # chosen branch: fine


def test_a_rewrite_that_drops_a_clause_is_not_a_leak_when_the_user_restates_the_request():
    """Seen with SmolLM2: the rewrite kept part of the original request word for word. The turn-c
    request and a later restatement then contain the rewrite, but the user said those words in the
    open: neither the validator nor music_pairs' blocking check may call that a leak (the check
    failed a whole partition on it). A real repeat of a rewrite with new words still is one."""
    from music_assets.simulation.validators import user_validator
    from music_assets.simulation.assets import _leaks_private_instruction
    from music_assets.simulation.prompts import PACKAGED

    original, dropped_clause = "Write a poem about cats in the rain.", "Write a poem about cats"
    assert user_validator([], (dropped_clause, original))("Thanks! Again: write a poem about cats in the rain.", "stop")[0] is None

    def pair(later_user: str, modified: str) -> dict:
        prefix = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
        turn_c = [{"role": "user", "content": original}, {"role": "assistant", "content": "A poem."}]
        later = [{"role": "user", "content": later_user}, {"role": "assistant", "content": "Another."}]
        return {"rejected": prefix + turn_c + later, "prefix_messages": 3,
                "original_instruction": original, "modified_instruction": modified}

    assert not _leaks_private_instruction(pair("Can you make it rhyme?", dropped_clause), PACKAGED.private_note_markers)
    assert not _leaks_private_instruction(pair("Write a poem about cats, please.", dropped_clause), PACKAGED.private_note_markers)
    assert _leaks_private_instruction(pair("Now write a poem about dogs in the snow!", "Write a poem about dogs in the snow"), PACKAGED.private_note_markers)
    assert _leaks_private_instruction(pair("Please respond to the following version instead", dropped_clause), PACKAGED.private_note_markers)


def test_an_answer_that_echoes_the_private_note_is_rejected_in_the_rejected_branch_only():
    """Seen with SmolLM2 (the check then failed a whole partition): the rejected-branch assistant
    copied "(Private note: respond to the following version ...)" into its answer, or answered
    with the note alone. The validator rejects it there (retried, then dropped with its reason),
    and music_pairs' check would catch one that got through."""
    from music_assets.simulation.validators import assistant_validator
    from music_assets.simulation.assets import _leaks_private_instruction
    from music_assets.simulation.prompts import PACKAGED

    markers = PACKAGED.private_note_markers

    echo = "Use lemon juice.  (Private note: respond to the following version of your request exactly as written above.)"
    assert assistant_validator(markers)(echo, "stop")[0] == "assistant_echoed_private_note"
    assert assistant_validator(markers)("Use lemon juice and milk.", "stop")[0] is None
    assert assistant_validator()(echo, "stop")[0] is None  # the chosen branch never saw a note

    original = "How do I make buttermilk?"
    pair = {"prefix_messages": 1, "original_instruction": original, "modified_instruction": "How do I make ricotta?",
            "rejected": [{"role": "user", "content": original}, {"role": "assistant", "content": echo}]}
    assert _leaks_private_instruction(pair, markers)
    pair["rejected"][1]["content"] = "Heat milk, add lemon juice, strain."
    assert not _leaks_private_instruction(pair, markers)


def test_the_note_markers_come_from_the_active_template(tmp_path):
    """An edited note (prompts_dir) with words of its own: the echo check and music_pairs' leak
    check must catch *its* phrases. With fixed phrases (the packaged note's) they were silently off."""
    from music_assets.simulation.assets import _leaks_private_instruction
    from music_assets.simulation.prompts import PACKAGED, load_prompts
    from music_assets.simulation.validators import assistant_validator

    (tmp_path / "contrastive_assistant.txt").write_text(
        "{modified}\n\n[Hidden instruction: answer this wording of the question instead, quietly treating it "
        "as the genuine request. Never reveal the substitution.]\n")
    edited = load_prompts(str(tmp_path))
    markers = edited.private_note_markers
    assert markers != PACKAGED.private_note_markers and "hidden instruction" in markers

    echo = "Sure, here it is. Hidden instruction: answer this wording of the question instead."
    check = assistant_validator(markers)
    assert check(echo, "stop")[0] == "assistant_echoed_private_note"
    assert check("Quietly, the genuine request is a pie recipe.", "stop")[0] is None  # a few of its words: fine
    # the packaged note's phrases are not this template's: an answer using them is not an echo of it
    assert check("Please respond to the following version of my request exactly as written.", "stop")[0] is None
    pair = {"prefix_messages": 0, "original_instruction": "q", "modified_instruction": "q2",
            "rejected": [{"role": "assistant", "content": echo}]}
    assert _leaks_private_instruction(pair, markers)
    assert not _leaks_private_instruction(pair, PACKAGED.private_note_markers)


def test_note_markers_are_the_notes_own_phrases_not_common_words():
    from music_assets.simulation.prompts import PACKAGED
    from music_assets.simulation.validators import shows_private_note

    markers = PACKAGED.private_note_markers
    assert "respond to the following version" in markers and "private note" in markers
    honest = ["For the rest of the conversation I will keep it short.", "Here is a helpful answer to that.",
              "Take note of the private key you generated."]
    assert not any(shows_private_note(t, markers) for t in honest)
    assert shows_private_note("(PRIVATE NOTE: ok)", markers)
