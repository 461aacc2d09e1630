"""What one context generates, turn by turn, and in what order.

Each context runs as a small generator of stages (`context_flow`): per turn, the user message(s),
at c the contrastive rewrite of the shared request, then the answers. Each stage hands its
generations over as `Job`s and gets their results back, without knowing how they are run (see
driver.py). A finished turn's rows go to the `Outbox` and are applied to the context's state at
once; a context whose generation failed for good is dropped there with its reason. This is the
simulation's logic; the driver only decides when requests are sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from music_assets.common.engines import Message, Sampling
from music_assets.common.generation import Failure, Validator
from music_assets.common.hashing import stable_hash
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.prompts import Prompts
from music_assets.simulation.state import ContextState, apply_row
from music_assets.simulation.validators import assistant_validator, rewrite_validator, user_validator


@dataclass
class Job:
    """One generation a context needs; `stage` picks the engine (user, rewrite or assistant)."""

    context_id: str
    turn: int
    stage: str
    conversation: list[Message]
    sampling: Sampling
    seed: int
    validator: Validator


class Outbox:
    """Finished turn rows and drops, waiting for the next commit."""

    def __init__(self, gkey: str):
        self.gkey, self.rows, self.drops = gkey, [], []

    def drop(self, state: ContextState, turn: int, stage: str, failure: Failure) -> None:
        state.dropped = True
        self.drops.append({"generation_key": self.gkey, "source": state.ctx.source, "context_id": state.ctx.context_id,
                           "turn": turn, "stage": stage, "reason": failure.reason, "last_output": failure.output[:500]})

    def take(self) -> tuple[list[dict], list[dict]]:
        taken = self.rows, self.drops
        self.rows, self.drops = [], []
        return taken


def context_flow(s: ContextState, settings: SimulationConfig, prompts: Prompts, gkey: str, outbox: Outbox):
    """One context's remaining turns, as a generator: each `yield` hands over the jobs of its next
    stage and receives their results (`Ok` or `Failure`, in order). Finished turns and drops go to
    `outbox`; a turn's rows (both branches, or none) are applied to the state at once."""
    cid = s.ctx.context_id
    for turn in range(s.next_turn, settings.turns + 1):
        # 1. user message: one while the branches are identical (up to c), then one per branch
        branches = ("shared",) if turn <= s.c else ("chosen", "rejected")
        users = yield [Job(cid, turn, "user", prompts.user_simulator_messages(s.visible(b)), settings.user_sampling,
                           _seed(gkey, cid, b, turn, "user"),
                           user_validator(s.visible(b), (s.modified, s.original) if b == "rejected" else None))
                       for b in branches]
        if failure := _first_failure(users):
            return outbox.drop(s, turn, "user", failure)
        user = dict(zip(branches, users))

        # 2. at c: the contrastive rewrite of the shared request, read in its conversation
        if turn == s.c:
            prompt = prompts.rewrite_messages(s.visible("shared"), user["shared"].text, settings.rewrite_context_chars)
            (rewrite,) = yield [Job(cid, turn, "rewrite", prompt, settings.rewrite_sampling,
                                    _seed(gkey, cid, "rejected", turn, "rewrite"), rewrite_validator(user["shared"].text, prompts.rewrite_example))]
            if isinstance(rewrite, Failure):
                return outbox.drop(s, turn, "rewrite", rewrite)
            s.original, s.modified = user["shared"].text, rewrite.text

        # 3. answers: shared before c; from c on, chosen (faithful) and rejected (private view)
        answering = ("shared",) if turn < s.c else ("chosen", "rejected")
        asked = {b: user["shared" if turn <= s.c else b] for b in answering}
        answers = yield [Job(cid, turn, "assistant",
                             s.rejected_private_view(asked[b].text, prompts) if b == "rejected"
                             else s.visible(b) + [{"role": "user", "content": asked[b].text}],
                             settings.assistant_sampling, _seed(gkey, cid, b, turn, "assistant"),
                             assistant_validator(prompts.private_note_markers if b == "rejected" else None))
                         for b in answering]
        if failure := _first_failure(answers):
            return outbox.drop(s, turn, "assistant", failure)

        # 4. the turn is done: its rows go to the next commit
        rows = [{"turn_key": stable_hash([cid, b, turn, gkey]), "generation_key": gkey,
                 "source": s.ctx.source, "context_id": cid, "branch": b, "turn": turn,
                 "contrast_turn": s.c, "user_message": asked[b].text, "assistant_message": answer.text,
                 "modified_instruction": s.modified if b == "rejected" else None,
                 "user_attempts": asked[b].attempts, "assistant_attempts": answer.attempts,
                 "user_tokens": asked[b].tokens, "assistant_tokens": answer.tokens,
                 "user_finish": asked[b].finish, "assistant_finish": answer.finish}
                for b, answer in zip(answering, answers)]
        outbox.rows += rows
        for row in rows:
            apply_row(s, row)


def _first_failure(results: list) -> Failure | None:
    return next((r for r in results if isinstance(r, Failure)), None)


def _seed(gkey: str, context_id: str, branch: str, turn: int, stage: str) -> int:
    return int(stable_hash([gkey, context_id, branch, turn, stage])[:8], 16)
