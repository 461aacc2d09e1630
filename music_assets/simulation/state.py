"""A context's progress through the simulation, where finished turns are kept, and resuming.

`ContextState` is everything the later turns of one context build on: the simulated turns before
the contrast turn c, each branch's turns from c on, the original request at c and its private
rewrite. It changes only by applying committed turn rows (`apply_row`), whether the row was just
generated or read back from the `TurnStore`: rows are committed as soon as a context finishes a
turn (both branches), keyed by hash(context, branch, turn, generation key), so on restart
`restore` rebuilds each context's state from what was committed and the simulation continues
where it stopped; a finished partition generates nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from music_assets.common.engines import Message
from music_assets.common.generation import GenerationStats
from music_assets.simulation.prompts import Prompts


@dataclass(frozen=True)
class Context:
    context_id: str
    source: str
    messages: list[Message]  # the seed prefix: k exchanges, ending with an assistant turn


@dataclass
class ContextState:
    ctx: Context
    c: int
    shared: list[Message] = field(default_factory=list)  # simulated turns before c
    chosen: list[Message] = field(default_factory=list)  # turns from c on, visible
    rejected: list[Message] = field(default_factory=list)
    original: str | None = None  # the user request at turn c
    modified: str | None = None  # its private rewrite, in force for the rejected assistant
    next_turn: int = 1
    dropped: bool = False

    def visible(self, branch: str) -> list[Message]:
        tail = {"shared": [], "chosen": self.chosen, "rejected": self.rejected}[branch]
        return self.ctx.messages + self.shared + tail

    def rejected_private_view(self, user_message: str, prompts: Prompts) -> list[Message]:
        """What the rejected assistant sees: in place of the user's request at turn c, the modified
        request with a private note asking it to answer that version (never in the transcript).

        The note sits on turn c's message rather than in a system prompt, so everything before
        turn c stays identical to the chosen branch's prompt, and every later turn's prompt
        extends the previous one: both are served from vLLM's prefix cache."""
        history = self.visible("rejected") + [{"role": "user", "content": user_message}]
        c_index = len(self.ctx.messages) + len(self.shared)  # the user message of turn c
        history = [dict(m) for m in history]
        history[c_index] = {"role": "user", "content": prompts.render("contrastive_assistant", modified=self.modified)}
        return history


class TurnStore:
    """Where finished turns and drops go. `load` returns what was committed before."""

    def load(self) -> tuple[list[dict], list[dict]]:
        raise NotImplementedError

    def commit(self, rows: list[dict], drops: list[dict]) -> None:
        raise NotImplementedError


@dataclass
class SimulationStats(GenerationStats):
    contexts: int = 0
    resumed_turns: int = 0
    committed_rows: int = 0
    completed: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> contexts


def restore(states: dict[str, ContextState], rows: list[dict], drops: list[dict], stats: SimulationStats) -> None:
    for d in drops:
        if d["context_id"] in states:
            states[d["context_id"]].dropped = True
    for row in sorted(rows, key=lambda r: (r["context_id"], r["turn"], r["branch"])):
        state = states.get(row["context_id"])
        if state is not None:
            apply_row(state, row)
            stats.resumed_turns += 1


def apply_row(state: ContextState, row: dict) -> None:
    turn_messages = [{"role": "user", "content": row["user_message"]},
                     {"role": "assistant", "content": row["assistant_message"]}]
    if row["branch"] == "shared":
        state.shared += turn_messages
    else:
        getattr(state, row["branch"]).extend(turn_messages)
        if row["branch"] == "rejected" and row["turn"] == state.c:
            state.original, state.modified = row["user_message"], row["modified_instruction"]
    state.next_turn = 1 + len(state.shared) // 2 + min(len(state.chosen), len(state.rejected)) // 2
