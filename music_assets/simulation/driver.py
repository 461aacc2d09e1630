"""Runs the context flows against the engines: when requests are sent, and retries.

Speed: the driver streams every stage's requests to the engine as soon as the stage before it is
done (`RequestStream`). On vLLM the request joins the running batch at once, so all live contexts
and both branches share the engine's batch, a retry does not wait for (or run almost alone after)
the rest of its step, and a short answer does not wait for the step's longest one. The two
branches' shared prefix, and each turn's prompt, which only extends the previous one, are reused
by vLLM's prefix cache. Engines without streaming get one batched call per round of finished
requests.

Bad output (the job's validator gives a reason) is retried with a new seed; after `max_attempts`
the failure goes back to the flow, which drops the context with that reason.

A message cut at max_tokens follows `on_length` (user and assistant messages; a cut rewrite is
always retried): `retry` samples it anew; `trim` keeps it up to its last complete sentence
(`trim_to_sentence`, the row says 'trimmed'); `continue` sends the cut message back as the last,
unfinished assistant message so the engine goes on writing it (vLLM's `continue_final_message`,
from the prefix cache), up to `max_continuations` times, and a message still cut then is retried.

`Engines` (which engine plays which role) is defined here, with the driver that maps each stage to
its engine's stream, so that simulate.py can import the driver without the driver importing it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from music_assets.common.engines import ChatEngine
from music_assets.common.generation import Failure, GenerationStats, Ok, attempt_seed, validated
from music_assets.simulation.flow import Job


@dataclass(frozen=True)
class Engines:
    user: ChatEngine
    assistant: ChatEngine
    rewriter: ChatEngine

    def identity(self) -> dict:
        return {"user": self.user.identity(), "assistant": self.assistant.identity(), "rewriter": self.rewriter.identity()}


class RequestKey(NamedTuple):
    """How the simulation names a request to the engine stream (unique by `serial`)."""

    serial: int
    context_id: str
    turn: int
    stage: str
    attempt: int
    continuation: int = 0  # >0: the request continues the attempt's cut message (`on_length: continue`)


@dataclass
class _Step:
    """The jobs a context is waiting on, with their results so far."""

    flow: object
    jobs: list[Job]
    results: list
    attempts: list[int]
    tokens: list[int]
    partial: list[str]  # the message so far while it is being continued ('' otherwise)
    continuations: list[int]  # continuations of the current attempt


class Driver:
    """Runs all context flows against the engines' request streams.

    Every job goes to its engine as soon as the stage before it is done, and a failed job is
    retried (new seed) as soon as its output comes back; so the engine keeps every live context
    and branch in its batch, instead of waiting at each step for the slowest request or running a
    retry almost alone. Finished turns are committed before any request that follows them is sent."""

    def __init__(self, engines: Engines, max_attempts: int, stats: GenerationStats, on_length: str = "retry",
                 max_continuations: int = 0):
        by_engine: dict[int, object] = {}  # one stream per engine: roles on one engine share its batches
        self.streams = {}
        for stage, engine in (("user", engines.user), ("assistant", engines.assistant), ("rewrite", engines.rewriter)):
            if id(engine) not in by_engine:
                by_engine[id(engine)] = engine.stream()
            self.streams[stage] = by_engine[id(engine)]
        self.distinct_streams = list(by_engine.values())
        self.max_attempts, self.stats = max_attempts, stats
        self.on_length, self.max_continuations = on_length, max_continuations
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
        n = len(jobs)
        step = _Step(flow, jobs, [None] * n, [0] * n, [0] * n, [""] * n, [0] * n)
        self.outgoing += [(step, i) for i in range(len(jobs))]

    def _send(self) -> None:
        for step, i in self.outgoing:
            job, conversation = step.jobs[i], step.jobs[i].conversation
            if step.partial[i]:  # the same attempt goes on writing its cut message
                conversation = conversation + [{"role": "assistant", "content": step.partial[i]}]
                self.stats.continuations += 1
            else:
                step.attempts[i] += 1
            key = RequestKey(next(self.serial), job.context_id, job.turn, job.stage, step.attempts[i], step.continuations[i])
            self.in_flight[key] = (step, i)
            seed = (attempt_seed(job.seed, step.attempts[i]) + 104729 * step.continuations[i]) % 2**31
            self.streams[job.stage].submit(key, conversation, job.sampling, seed, session=job.context_id)
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
            on_length = "retry" if step.jobs[i].stage == "rewrite" else self.on_length
            text = step.partial[i] + out.text
            if out.truncated and on_length == "continue" and step.continuations[i] < self.max_continuations:
                # the engine continues the message as given: trailing spaces would end the word it is in
                step.partial[i], step.continuations[i] = text.rstrip(), step.continuations[i] + 1
                self.outgoing.append((step, i))
                continue
            result = validated(step.jobs[i].validator, out, step.attempts[i], step.tokens[i], on_length, text,
                               continued=step.continuations[i] > 0)
            step.partial[i], step.continuations[i] = "", 0
            if isinstance(result, Ok) and result.finish == "trimmed":
                self.stats.trimmed += 1
            if isinstance(result, Failure) and step.attempts[i] < self.max_attempts:
                self.stats.retries[result.reason] += 1
                self.outgoing.append((step, i))
                continue
            step.results[i] = result
            if all(r is not None for r in step.results):
                self._advance(step.flow, step.results)
