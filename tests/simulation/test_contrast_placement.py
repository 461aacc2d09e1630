"""Where the contrast happens: a scripted engine records every prompt the simulation sends, and
each is compared with the prompt the method calls for.

For a context with contrast turn c and T turns: turns before c are generated once (branch
'shared'), so both branches' prompts before c are the same; at c the user message is still shared;
from c on the rejected assistant's prompt carries, in place of the user's turn-c message, the
modified request with the private note (the `contrastive_assistant` template), and the chosen
assistant's never does; each branch's user simulator sees only its own branch's history."""

from collections import defaultdict

import pytest

from music_assets.common.engines import Generation
from music_assets.common.generation import attempt_seed
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.driver import Engines
from music_assets.simulation.flow import _seed
from music_assets.simulation.prompts import PACKAGED
from music_assets.simulation.simulate import generation_key, simulate
from music_assets.simulation.state import Context
from music_assets.simulation.validators import shows_private_note
from resources.llm import LLMEngine
from tests.simulation.test_simulation_faults import MemoryStore

TURNS = 4
CONTEXTS = [Context(f"ctx-{i}", "test", [{"role": "user", "content": f"Seed question {i}"},
                                          {"role": "assistant", "content": f"Seed answer {i}."}]) for i in range(3)]
SENT: list = []  # (seed, conversation, answer) of every request


class RecordingEngine(LLMEngine):
    """Records each prompt; answers with text unique to the request (its seed), so every message
    in a later prompt can be traced to the request that wrote it."""

    model: str = "recording"

    def chat(self, conversations, sampling, seeds=None):
        out = []
        for conv, seed in zip(conversations, seeds):
            if conv[0]["role"] == "system":
                text = f"Could you tell me more, question q{seed}?"
            elif conv[-1]["content"].startswith(PACKAGED.templates["contrastive_rewrite"][:40]):
                text = f"A subtly different request about goats, variant r{seed}"
            else:
                text = f"Here is answer a{seed}."
            SENT.append((seed, [dict(m) for m in conv], text))
            out.append(Generation([text], ["stop"], completion_tokens=5))
        return out


def run(settings):
    SENT.clear()
    engine = RecordingEngine()
    engines = Engines(engine, engine, engine)
    stats = simulate(CONTEXTS, engines, settings, MemoryStore(), log=lambda _: None)
    assert stats.completed == len(CONTEXTS) and not stats.retries
    gkey = generation_key(settings, engines, PACKAGED)
    # every job's seed names its context, branch, turn and stage (first attempts: no retries here)
    names = {attempt_seed(_seed(gkey, ctx.context_id, b, t, stage), 1): (ctx.context_id, b, t, stage)
             for ctx in CONTEXTS for b in ("shared", "chosen", "rejected")
             for t in range(1, settings.turns + 1) for stage in ("user", "rewrite", "assistant")}
    assert len(names) == len(CONTEXTS) * 3 * settings.turns * 3  # no two jobs share a seed
    sent, answers = defaultdict(list), {}  # (context, branch, turn, stage) -> its prompts; -> its answer
    for seed, conv, text in SENT:
        sent[names[seed]].append(conv)
        answers[names[seed]] = text
    return sent, answers


def turn_messages(output, cid, branch, turn):
    return [{"role": "user", "content": output[(cid, branch, turn, "user")]},
            {"role": "assistant", "content": output[(cid, branch, turn, "assistant")]}]


@pytest.mark.parametrize("c", range(1, TURNS + 1))
def test_the_contrast_is_in_the_rejected_assistants_prompts_from_c_on_and_nowhere_else(c):
    settings = SimulationConfig(turns=TURNS, contrast_turn=c, min_contrast_turns=1)
    sent, output = run(settings)
    for ctx in CONTEXTS:
        cid = ctx.context_id
        mine = {k: v for k, v in sent.items() if k[0] == cid}
        assert all(len(v) == 1 for v in mine.values())  # each generation requested once
        # before c: one shared user message and answer per turn; at c: a shared user message, one
        # rewrite, then an answer per branch; after c: a user message and an answer per branch
        expected = {(cid, "shared", t, s) for t in range(1, c) for s in ("user", "assistant")}
        expected |= {(cid, "shared", c, "user"), (cid, "rejected", c, "rewrite")}
        expected |= {(cid, b, t, "assistant") for b in ("chosen", "rejected") for t in range(c, TURNS + 1)}
        expected |= {(cid, b, t, "user") for b in ("chosen", "rejected") for t in range(c + 1, TURNS + 1)}
        assert set(mine) == expected

        shared = [m for t in range(1, c) for m in turn_messages(output, cid, "shared", t)]
        original = output[(cid, "shared", c, "user")]
        modified = output[(cid, "rejected", c, "rewrite")]
        note = PACKAGED.render("contrastive_assistant", modified=modified)
        assert modified in note and shows_private_note(note, PACKAGED.private_note_markers)

        # the rewrite is asked of the shared turn-c request, in its conversation (seed context and
        # the shared turns before c; their latest messages within rewrite_context_chars)
        (rewrite_prompt,) = sent[(cid, "rejected", c, "rewrite")]
        assert rewrite_prompt == PACKAGED.rewrite_messages(ctx.messages + shared, original, settings.rewrite_context_chars)
        assert original in rewrite_prompt[-1]["content"]
        assert rewrite_prompt[:-1] == (ctx.messages + shared)[-len(rewrite_prompt) + 1:]  # the chat so far, as is
        # before c (and the user message at c): one prompt each, built on the shared history only
        for t in range(1, c + 1):
            history = ctx.messages + shared[:2 * (t - 1)]
            assert sent[(cid, "shared", t, "user")] == [PACKAGED.user_simulator_messages(history)]
            if t < c:
                asked = output[(cid, "shared", t, "user")]
                assert sent[(cid, "shared", t, "assistant")] == [history + [{"role": "user", "content": asked}]]

        for branch in ("chosen", "rejected"):
            other = {"chosen": "rejected", "rejected": "chosen"}[branch]
            # the branch's visible history from c on: the shared turn-c request, then its own turns
            own = [{"role": "user", "content": original},
                   {"role": "assistant", "content": output[(cid, branch, c, "assistant")]}]
            own += [m for t in range(c + 1, TURNS + 1) for m in turn_messages(output, cid, branch, t)]
            others = {output[(cid, other, t, s)] for t in range(c, TURNS + 1) for s in ("user", "assistant")
                      if (cid, other, t, s) in output}
            for t in range(c, TURNS + 1):
                before_t = ctx.messages + shared + own[:2 * (t - c)]
                asked = own[2 * (t - c)]
                (assistant_prompt,) = sent[(cid, branch, t, "assistant")]
                if branch == "chosen":
                    assert assistant_prompt == before_t + [asked]
                else:  # the note in place of the user's turn-c message, in every turn from c on
                    private = before_t + [asked]
                    private[len(ctx.messages) + len(shared)] = {"role": "user", "content": note}
                    assert assistant_prompt == private
                    assert original not in [m["content"] for m in assistant_prompt]
                # the prompt before turn c's message is the same in both branches
                assert assistant_prompt[:len(ctx.messages) + len(shared)] == ctx.messages + shared
                if t > c:
                    # the user simulator sees its own branch's history, never the other's, nor the note
                    (user_prompt,) = sent[(cid, branch, t, "user")]
                    assert user_prompt == PACKAGED.user_simulator_messages(before_t)
                    texts = "\n".join(m["content"] for m in user_prompt)
                    assert not any(o in texts for o in others)
                    assert modified not in texts and note not in texts
                if branch == "chosen":
                    texts = "\n".join(m["content"] for m in assistant_prompt)
                    assert modified.lower() not in texts.lower()
                    assert not shows_private_note(texts, PACKAGED.private_note_markers)
                assert not any(o in "\n".join(m["content"] for m in assistant_prompt) for o in others)


def test_the_rewriters_view_of_the_conversation_is_bounded_to_its_latest_messages():
    history = [{"role": "user", "content": f"Question {i} " + "x" * 200} if i % 2 == 0 else
               {"role": "assistant", "content": f"Answer {i} " + "y" * 200} for i in range(10)]
    prompt = PACKAGED.rewrite_messages(history, "Make it shorter.", 900)
    assert [m["content"][:9] for m in prompt[:-1]] == ["Question ", "Answer 7 ", "Question ", "Answer 9 "]
    assert prompt[0]["content"].startswith("Question 6") and prompt[-1]["role"] == "user"
    assert sum(len(m["content"]) for m in prompt[:-1]) <= 900
    assert "Make it shorter." in prompt[-1]["content"] and "Question" not in prompt[-1]["content"]
    assert PACKAGED.rewrite_messages(history, "Make it shorter.", 0) == prompt[-1:]
    long_last = PACKAGED.rewrite_messages([{"role": "user", "content": "z" * 5000 + " the end"}], "Shorter?", 100)
    assert long_last[0]["content"].endswith("the end") and len(long_last[0]["content"]) == 101
    # a window that would open with an answer starts at the next user turn instead
    assert PACKAGED.rewrite_messages(history[:2], "Again?", 215)[0]["role"] == "user"
