"""The MUSIC simulation loop: seed contexts in, chosen and rejected continuations out.

For each context, T simulated turns follow the seed prefix. A user-simulator LLM writes each user
message from its branch's own visible history; an assistant LLM answers. Turns before the
contrast turn c are the same for both branches and generated once (branch 'shared'). At turn c the
user message is still shared, then the branches split: the chosen assistant answers it faithfully,
while the rejected assistant privately sees a *modified* version of it (an LLM rewrite that changes
one detail) and answers that. The modified request stays in the rejected assistant's view for the
rest of the conversation, so the flaw persists; the visible transcript always shows the original.

Speed: each context runs as a small generator of stages (user message, rewrite at c, answers),
and a driver streams every stage's requests to the engine as soon as the stage before it is done
(`RequestStream`). On vLLM the request joins the running batch at once, so all live contexts and
both branches share the engine's batch, a retry does not wait for (or run almost alone after) the
rest of its step, and a short answer does not wait for the step's longest one. The two branches'
shared prefix, and each turn's prompt, which only extends the previous one, are reused by vLLM's
prefix cache. Engines without streaming get one batched call per round of finished requests.

Resumability: as soon as a context finishes a turn (both branches), its rows are committed (see
`TurnStore`), before any request that builds on them is sent, keyed by
hash(context, branch, turn, generation key). On restart the committed rows rebuild each context's
state and the loop continues where it stopped; a finished partition generates nothing.

Bad output (empty, cut at max tokens, a user simulator that writes as the assistant, a rewrite
that returns the request unchanged) is retried with a new seed; after `max_attempts` the context
is dropped with a recorded reason.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from music_assets.common.engines import ChatEngine, Message, Sampling
from music_assets.common.hashing import stable_hash
from music_assets.simulation.prompts import PROMPT_VERSION, REWRITE_EXAMPLE, render, user_simulator_messages


@dataclass(frozen=True)
class SimulationSettings:
    turns: int = 3  # T: simulated turns after the seed context (paper: 5)
    contrast_turn: int | None = None  # fixed c (1-based), or None: sampled per context
    min_contrast_turns: int = 2  # the rejected branch is flawed in at least this many turns
    seed: int = 0
    max_attempts: int = 3  # per generation, including the first
    user_sampling: Sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=96)
    assistant_sampling: Sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=256)
    rewrite_sampling: Sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=128)

    def __post_init__(self):
        if self.turns < 1:
            raise ValueError("simulation.turns must be >= 1")
        if not 1 <= self.min_contrast_turns <= self.turns:
            raise ValueError("simulation.min_contrast_turns must be between 1 and turns")
        if self.contrast_turn is not None and not 1 <= self.contrast_turn <= self.turns - self.min_contrast_turns + 1:
            raise ValueError(
                f"simulation.contrast_turn={self.contrast_turn} leaves fewer than "
                f"{self.min_contrast_turns} flawed turns out of {self.turns}"
            )

    def contrast_turn_for(self, context_id: str) -> int:
        """c for one context: fixed, or drawn from [1, T - min_contrast_turns + 1], seeded."""
        if self.contrast_turn is not None:
            return self.contrast_turn
        rng = random.Random(f"{self.seed}:contrast:{context_id}")
        return rng.randint(1, self.turns - self.min_contrast_turns + 1)

    def as_dict(self) -> dict:
        return {
            "turns": self.turns,
            "contrast_turn": self.contrast_turn,
            "min_contrast_turns": self.min_contrast_turns,
            "seed": self.seed,
            "max_attempts": self.max_attempts,
            "user_sampling": self.user_sampling.as_dict(),
            "assistant_sampling": self.assistant_sampling.as_dict(),
            "rewrite_sampling": self.rewrite_sampling.as_dict(),
        }


@dataclass(frozen=True)
class Engines:
    user: ChatEngine
    assistant: ChatEngine
    rewriter: ChatEngine

    def identity(self) -> dict:
        return {"user": self.user.identity(), "assistant": self.assistant.identity(), "rewriter": self.rewriter.identity()}


def generation_key(settings: SimulationSettings, engines: Engines) -> str:
    """Everything that determines the generated text: prompts, models, sampling, settings."""
    return stable_hash({"prompts": PROMPT_VERSION, "engines": engines.identity(), "settings": settings.as_dict()})


@dataclass(frozen=True)
class Context:
    context_id: str
    source: str
    messages: list[Message]  # the seed prefix: k exchanges, ending with an assistant turn


@dataclass
class _State:
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

    def rejected_private_view(self, user_message: str, turn: int) -> list[Message]:
        """What the rejected assistant sees: in place of the user's request at turn c, the modified
        request with a private note asking it to answer that version (never in the transcript).

        The note sits on turn c's message rather than in a system prompt, so everything before
        turn c stays identical to the chosen branch's prompt, and every later turn's prompt
        extends the previous one: both are served from vLLM's prefix cache."""
        history = self.visible("rejected") + [{"role": "user", "content": user_message}]
        c_index = len(self.ctx.messages) + len(self.shared)  # the user message of turn c
        history = [dict(m) for m in history]
        history[c_index] = {"role": "user", "content": render("contrastive_assistant", modified=self.modified)}
        return history


class TurnStore:
    """Where finished turns and drops go. `load` returns what was committed before."""

    def load(self) -> tuple[list[dict], list[dict]]:
        raise NotImplementedError

    def commit(self, rows: list[dict], drops: list[dict]) -> None:
        raise NotImplementedError


@dataclass
class GenerationStats:
    retries: Counter = field(default_factory=Counter)  # reason -> retried generations
    calls: int = 0  # batched calls (Best-of-N), or rounds of finished generations from a stream (simulation)
    requests: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0


@dataclass
class SimulationStats(GenerationStats):
    contexts: int = 0
    resumed_turns: int = 0
    committed_rows: int = 0
    completed: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> contexts


def simulate(
    contexts: list[Context],
    engines: Engines,
    settings: SimulationSettings,
    store: TurnStore,
    log: Callable[[str], None] = print,
) -> SimulationStats:
    gkey = generation_key(settings, engines)
    stats = SimulationStats(contexts=len(contexts))
    states = {ctx.context_id: _State(ctx, settings.contrast_turn_for(ctx.context_id)) for ctx in contexts}
    _restore(states, *store.load(), stats)
    outbox = _Outbox(gkey)

    def commit() -> None:
        rows, drops = outbox.take()
        if not rows and not drops:
            return
        store.commit(rows, drops)
        stats.committed_rows += len(rows)
        for d in drops:
            stats.dropped[d["reason"]] += 1
        finished = sum(1 for s in states.values() if not s.dropped and s.next_turn > settings.turns)
        log(f"committed {len(rows)} turn rows, {len(drops)} drops; {finished} of {len(states)} contexts finished, "
            f"{sum(stats.dropped.values())} dropped, {stats.completion_tokens} tokens so far "
            f"({stats.tokens_per_second:.0f} tok/s)")

    flows = [_context_flow(s, settings, gkey, outbox) for s in states.values()
             if not s.dropped and s.next_turn <= settings.turns]
    _Driver(engines, settings.max_attempts, stats).run(flows, commit)
    stats.completed = sum(1 for s in states.values() if not s.dropped and s.next_turn > settings.turns)
    return stats


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


class _Outbox:
    """Finished turn rows and drops, waiting for the next commit."""

    def __init__(self, gkey: str):
        self.gkey, self.rows, self.drops = gkey, [], []

    def drop(self, state: _State, turn: int, stage: str, failure: Failure) -> None:
        state.dropped = True
        self.drops.append({"generation_key": self.gkey, "source": state.ctx.source, "context_id": state.ctx.context_id,
                           "turn": turn, "stage": stage, "reason": failure.reason, "last_output": failure.output[:500]})

    def take(self) -> tuple[list[dict], list[dict]]:
        taken = self.rows, self.drops
        self.rows, self.drops = [], []
        return taken


def _context_flow(s: _State, settings: SimulationSettings, gkey: str, outbox: _Outbox):
    """One context's remaining turns, as a generator: each `yield` hands over the jobs of its next
    stage and receives their results (`Ok` or `Failure`, in order). Finished turns and drops go to
    `outbox`; a turn's rows (both branches, or none) are applied to the state at once."""
    cid = s.ctx.context_id
    for turn in range(s.next_turn, settings.turns + 1):
        # 1. user message: one while the branches are identical (up to c), then one per branch
        branches = ("shared",) if turn <= s.c else ("chosen", "rejected")
        users = yield [Job(cid, turn, "user", user_simulator_messages(s.visible(b)), settings.user_sampling,
                           _seed(gkey, cid, b, turn, "user"),
                           user_validator(s.visible(b), (s.modified, s.original) if b == "rejected" else None))
                       for b in branches]
        if failure := _first_failure(users):
            return outbox.drop(s, turn, "user", failure)
        user = dict(zip(branches, users))

        # 2. at c: the contrastive rewrite of the shared request
        if turn == s.c:
            prompt = [{"role": "user", "content": render("contrastive_rewrite", instruction=user["shared"].text)}]
            (rewrite,) = yield [Job(cid, turn, "rewrite", prompt, settings.rewrite_sampling,
                                    _seed(gkey, cid, "rejected", turn, "rewrite"), _rewrite_validator(user["shared"].text))]
            if isinstance(rewrite, Failure):
                return outbox.drop(s, turn, "rewrite", rewrite)
            s.original, s.modified = user["shared"].text, rewrite.text

        # 3. answers: shared before c; from c on, chosen (faithful) and rejected (private view)
        answering = ("shared",) if turn < s.c else ("chosen", "rejected")
        asked = {b: user["shared" if turn <= s.c else b] for b in answering}
        answers = yield [Job(cid, turn, "assistant",
                             s.rejected_private_view(asked[b].text, turn) if b == "rejected"
                             else s.visible(b) + [{"role": "user", "content": asked[b].text}],
                             settings.assistant_sampling, _seed(gkey, cid, b, turn, "assistant"),
                             assistant_validator(private_note=b == "rejected"))
                         for b in answering]
        if failure := _first_failure(answers):
            return outbox.drop(s, turn, "assistant", failure)

        # 4. the turn is done: its rows go to the next commit
        rows = [{"turn_key": stable_hash([cid, b, turn, gkey]), "generation_key": gkey,
                 "source": s.ctx.source, "context_id": cid, "branch": b, "turn": turn,
                 "contrast_turn": s.c, "user_message": asked[b].text, "assistant_message": answer.text,
                 "modified_instruction": s.modified if b == "rejected" else None,
                 "user_attempts": asked[b].attempts, "assistant_attempts": answer.attempts,
                 "user_tokens": asked[b].tokens, "assistant_tokens": answer.tokens}
                for b, answer in zip(answering, answers)]
        outbox.rows += rows
        for row in rows:
            _apply(s, row)


def _first_failure(results: list) -> Failure | None:
    return next((r for r in results if isinstance(r, Failure)), None)


class RequestKey(NamedTuple):
    """How the simulation names a request to the engine stream (unique by `serial`)."""

    serial: int
    context_id: str
    turn: int
    stage: str
    attempt: int


@dataclass
class _Step:
    """The jobs a context is waiting on, with their results so far."""

    flow: object
    jobs: list[Job]
    results: list
    attempts: list[int]
    tokens: list[int]


class _Driver:
    """Runs all context flows against the engines' request streams.

    Every job goes to its engine as soon as the stage before it is done, and a failed job is
    retried (new seed) as soon as its output comes back; so the engine keeps every live context
    and branch in its batch, instead of waiting at each step for the slowest request or running a
    retry almost alone. Finished turns are committed before any request that follows them is sent."""

    def __init__(self, engines: Engines, max_attempts: int, stats: GenerationStats):
        by_engine: dict[int, object] = {}  # one stream per engine: roles on one engine share its batches
        self.streams = {}
        for stage, engine in (("user", engines.user), ("assistant", engines.assistant), ("rewrite", engines.rewriter)):
            if id(engine) not in by_engine:
                by_engine[id(engine)] = engine.stream()
            self.streams[stage] = by_engine[id(engine)]
        self.distinct_streams = list(by_engine.values())
        self.max_attempts, self.stats = max_attempts, stats
        self.in_flight: dict[RequestKey, tuple[_Step, int]] = {}
        self.outgoing: list[tuple[_Step, int]] = []
        self.serial = iter(range(2**62))

    def run(self, flows: list, commit: Callable[[], None]) -> None:
        streams = self.distinct_streams
        try:
            for flow in flows:
                self._advance(flow, None)
            while True:
                commit()
                self._send()
                if not self.in_flight:
                    return
                for stream in streams:
                    if stream.pending:
                        self._receive(stream)
        finally:
            for stream in streams:
                stream.close()

    def _advance(self, flow, results) -> None:
        try:
            jobs = flow.send(results)
        except StopIteration:
            return
        step = _Step(flow, jobs, [None] * len(jobs), [0] * len(jobs), [0] * len(jobs))
        self.outgoing += [(step, i) for i in range(len(jobs))]

    def _send(self) -> None:
        for step, i in self.outgoing:
            step.attempts[i] += 1
            job = step.jobs[i]
            key = RequestKey(next(self.serial), job.context_id, job.turn, job.stage, step.attempts[i])
            self.in_flight[key] = (step, i)
            self.streams[job.stage].submit(key, job.conversation, job.sampling, _attempt_seed(job.seed, step.attempts[i]))
            self.stats.requests += 1
        self.outgoing = []

    def _receive(self, stream) -> None:
        started = time.perf_counter()
        finished = stream.wait()
        self.stats.generation_seconds += time.perf_counter() - started
        self.stats.calls += 1
        for key, out in finished:
            step, i = self.in_flight.pop(key)
            self.stats.completion_tokens += out.completion_tokens
            step.tokens[i] += out.completion_tokens
            result = _validated(step.jobs[i].validator, out, step.attempts[i], step.tokens[i])
            if isinstance(result, Failure) and step.attempts[i] < self.max_attempts:
                self.stats.retries[result.reason] += 1
                self.outgoing.append((step, i))
                continue
            step.results[i] = result
            if all(r is not None for r in step.results):
                self._advance(step.flow, step.results)


# --- resume -------------------------------------------------------------------------------------


def _restore(states: dict[str, _State], rows: list[dict], drops: list[dict], stats: SimulationStats) -> None:
    for d in drops:
        if d["context_id"] in states:
            states[d["context_id"]].dropped = True
    for row in sorted(rows, key=lambda r: (r["context_id"], r["turn"], r["branch"])):
        state = states.get(row["context_id"])
        if state is not None:
            _apply(state, row)
            stats.resumed_turns += 1


def _apply(state: _State, row: dict) -> None:
    turn_messages = [{"role": "user", "content": row["user_message"]},
                     {"role": "assistant", "content": row["assistant_message"]}]
    if row["branch"] == "shared":
        state.shared += turn_messages
    else:
        getattr(state, row["branch"]).extend(turn_messages)
        if row["branch"] == "rejected" and row["turn"] == state.c:
            state.original, state.modified = row["user_message"], row["modified_instruction"]
    state.next_turn = 1 + len(state.shared) // 2 + min(len(state.chosen), len(state.rejected)) // 2


def _seed(gkey: str, context_id: str, branch: str, turn: int, stage: str) -> int:
    return int(stable_hash([gkey, context_id, branch, turn, stage])[:8], 16)


# --- batched generation with validation and retries ---------------------------------------------


@dataclass
class Ok:
    text: str
    attempts: int
    tokens: int


@dataclass
class Failure:
    reason: str
    output: str


Validator = Callable[[str, str], tuple[str | None, str]]  # (text, finish) -> (failure reason, cleaned)


class BatchGenerator:
    """Batched generation with validation and retries (used by the simulation and Best-of-N)."""

    def __init__(self, max_attempts: int, stats: GenerationStats):
        self.max_attempts, self.stats = max_attempts, stats

    def run(self, engine, conversations, sampling, seeds, validators) -> list[Ok | Failure]:
        """Generates for all conversations in one batched call, then retries the failures (again
        batched) with new seeds, up to `max_attempts` in all."""
        results: list[Ok | Failure | None] = [None] * len(conversations)
        pending = list(range(len(conversations)))
        tokens = [0] * len(conversations)
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            started = time.perf_counter()
            outs = engine.chat([conversations[i] for i in pending], sampling,
                               [_attempt_seed(seeds[i], attempt) for i in pending])
            self.stats.generation_seconds += time.perf_counter() - started
            self.stats.calls += 1
            self.stats.requests += len(pending)
            still = []
            for i, out in zip(pending, outs):
                self.stats.completion_tokens += out.completion_tokens
                tokens[i] += out.completion_tokens
                results[i] = _validated(validators[i], out, attempt, tokens[i])
                if isinstance(results[i], Failure) and attempt < self.max_attempts:
                    self.stats.retries[results[i].reason] += 1
                    still.append(i)
            pending = still
        return results


def _attempt_seed(seed: int, attempt: int) -> int:
    """A new seed per attempt, so a retry samples differently (and reproducibly)."""
    return (seed + 7919 * (attempt - 1)) % 2**31


def _validated(validator: Validator, out, attempt: int, tokens: int) -> Ok | Failure:
    reason, cleaned = validator(out.text, out.finish_reasons[0])
    return Ok(cleaned, attempt, tokens) if reason is None else Failure(reason, out.error or out.text)


_ROLE_LABEL = re.compile(r"^\s*(?:\*\*)?(user|the user|human|me)\s*(?:\*\*)?\s*:\s*", re.IGNORECASE)
_ASSISTANT_LABEL = re.compile(r"^\s*(?:\*\*)?(assistant|ai|bot|chatbot)\s*(?:\*\*)?\s*:", re.IGNORECASE | re.MULTILINE)
_REWRITE_LABEL = re.compile(r"^\s*(?:rewritten|modified|new)?\s*(?:request|instruction)?\s*:\s*", re.IGNORECASE)
_TEMPLATE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def basic_validator(text: str, finish: str) -> tuple[str | None, str]:
    if finish == "error":  # the engine refused the request (e.g. the prompt outgrew the context)
        return "engine_rejected", text
    if finish == "length":
        return "truncated", text
    cleaned = text.strip()
    if any(marker in cleaned for marker in _TEMPLATE_MARKERS):
        return "template_markers_in_output", cleaned
    if not cleaned:
        return "empty", cleaned
    return None, cleaned


# Phrases of prompts/contrastive_assistant.txt: one of them in a visible message means the private
# note leaked (SmolLM2-135M sometimes copies the note into its answer, or answers with the note alone).
PRIVATE_NOTE_MARKERS = ("private note", "respond to the following version")


def shows_private_note(text: str) -> bool:
    words = _normalize(text)  # the markers are plain words: case, punctuation and spacing ignored
    return any(marker in words for marker in PRIVATE_NOTE_MARKERS)


def assistant_validator(private_note: bool = False) -> Validator:
    """`private_note`: the answer was written from the rejected branch's private view (from c on),
    so repeating the note would put it in the visible transcript."""
    if not private_note:
        return basic_validator

    def check(text: str, finish: str):
        reason, cleaned = basic_validator(text, finish)
        if not reason and shows_private_note(cleaned):
            reason = "assistant_echoed_private_note"
        return reason, cleaned

    return check


def user_validator(history: list[Message], private_rewrite: tuple[str, str] | None = None) -> Validator:
    """`private_rewrite`: in the rejected branch after c, (modified request, original request); a
    simulated user must not repeat the modified one (the visible transcript would then show the
    user asking for it)."""
    last_answer = next((m["content"] for m in reversed(history) if m["role"] == "assistant"), "")

    def check(text: str, finish: str):
        reason, cleaned = basic_validator(text, finish)
        if reason:
            return reason, cleaned
        if _ASSISTANT_LABEL.search(cleaned):  # at the start, or on any later line: it wrote both sides
            return "user_answered_as_assistant", cleaned
        cleaned = _unquote(_ROLE_LABEL.sub("", cleaned, count=1))
        if not cleaned:
            return "empty", cleaned
        # Repeating the assistant's last answer back is the assistant's voice, not a user's.
        if last_answer and word_jaccard(cleaned, last_answer) >= 0.8:
            return "user_answered_as_assistant", cleaned
        if private_rewrite and shows_private_rewrite(cleaned, *private_rewrite):
            return "user_repeated_private_rewrite", cleaned
        return None, cleaned

    return check


def _rewrite_validator(original: str) -> Validator:
    def check(text: str, finish: str):
        reason, cleaned = basic_validator(text, finish)
        if reason:
            return reason, cleaned
        cleaned = _unquote(_REWRITE_LABEL.sub("", cleaned, count=1))
        if not cleaned:
            return "empty", cleaned
        if _normalize(cleaned) == _normalize(original) or word_jaccard(cleaned, original) >= 0.95:
            return "rewrite_unchanged", cleaned
        if REWRITE_EXAMPLE and _normalize(REWRITE_EXAMPLE) in _normalize(cleaned) \
                and _normalize(REWRITE_EXAMPLE) not in _normalize(original):
            return "rewrite_copied_example", cleaned
        return None, cleaned

    return check


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    return text


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def shows_private_rewrite(text: str, modified: str, original: str) -> bool:
    """Whether visible `text` shows the private modified request. Words only (case, punctuation
    and spacing ignored). A rewrite that is part of the original request (one that drops a
    clause, say) cannot be told apart from the user restating what they asked, so it never
    counts: the user said those words in the open."""
    needle = _normalize(modified)
    return bool(needle) and needle in _normalize(text) and needle not in _normalize(original)


def word_jaccard(a: str, b: str) -> float:
    wa, wb = set(re.findall(r"\w+", a.lower())), set(re.findall(r"\w+", b.lower()))
    return len(wa & wb) / len(wa | wb) if wa | wb else 1.0
