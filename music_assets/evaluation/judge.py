"""Pairwise LLM judging with position swap: two conversations are judged twice, once in each order,
and a verdict counts only when both orders agree (MT-Bench's rule against position bias).

The judge answers `[[A]]`, `[[B]]` or `[[C]]` (tie) on its last line (prompts/judge_pairwise.txt).
When either order gives no verdict the pair is a *judge error*, not a tie: a tie is something the
judge said, an error is something it could not say, and counting errors as ties would pull every
win rate towards 0.5 by however often the judge failed. Each error keeps its reason and the raw
text (the engine's refusal or the judge's answer), so a report can say why:

- `judge_error`: the engine refused the request (the prompt does not fit its context, or a
  server's 4xx); the raw text is the engine's reason;
- `judge_truncated`: the answer hit `max_tokens` (or the end of the context) before a verdict;
- `unparsed`: the answer ended without a verdict.

A judge prompt holds two whole conversations, so it outgrows a context sized for one: the judge
asks its engine for one that holds the longest prompt plus the answer (`sized_judge`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from music_assets.common.engines import ChatEngine, Generation, Message, Sampling
from music_assets.simulation.prompts import PACKAGED, Prompts

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# Reasons of a pair the judge decided (`identical`: a tie it did not need to be asked about) ...
DECIDED_REASONS = ("consistent", "judge_tie", "inconsistent", "identical")
# ... and of a pair it could not judge, most telling first (a pair takes the first that applies).
ERROR_REASONS = ("judge_error", "judge_truncated", "unparsed")


def render_transcript(messages: list[Message]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages)


def judge_prompt(a: list[Message], b: list[Message], prompts: Prompts = PACKAGED) -> list[Message]:
    return [{"role": "user", "content": prompts.render("judge_pairwise", conversation_a=render_transcript(a),
                                                       conversation_b=render_transcript(b))}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the judge's answer: the last bracketed verdict it wrote (a judge
    may quote the format while reasoning), or None when there is none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


@dataclass(frozen=True)
class Judgment:
    """The judge's view of (first, second), asked in both orders."""

    raw_forward: str  # first shown as A (the engine's refusal when it refused)
    raw_swapped: str  # second shown as A
    verdict_forward: str | None  # 'A' | 'B' | 'C' | None (no verdict)
    verdict_swapped: str | None
    preferred: str | None  # 'first' | 'second' | 'tie'; None when the judge could not judge the pair
    reason: str  # one of DECIDED_REASONS or ERROR_REASONS

    @property
    def error(self) -> bool:
        return self.reason in ERROR_REASONS


def combine(forward: str | None, swapped: str | None) -> tuple[str | None, str]:
    """(preferred, reason) from the two verdicts; in the swapped call 'A' is the second conversation.
    A missing verdict makes the pair `unparsed` here; `judge_pairs` names the finer reason."""
    if forward is None or swapped is None:
        return None, "unparsed"
    as_first = {"A": "first", "B": "second", "C": "tie"}[forward]
    as_swapped = {"A": "second", "B": "first", "C": "tie"}[swapped]
    if as_first == as_swapped:
        return as_first, "judge_tie" if as_first == "tie" else "consistent"
    return "tie", "inconsistent"


def output_error(gen: Generation, verdict: str | None) -> str | None:
    """Why one judge output gives no verdict (an ERROR_REASONS entry), or None when it gives one.
    A verdict written before the answer was cut still counts."""
    if gen.finish_reasons[0] == "error":
        return "judge_error"
    if verdict is not None:
        return None
    return "judge_truncated" if gen.finish_reasons[0] == "length" else "unparsed"


def sized_judge(judge: ChatEngine, requests: list[list[Message]], sampling: Sampling) -> ChatEngine:
    """The engine to send `requests` to: one whose context holds the longest of them plus a whole
    answer (`sampling.max_tokens`), from engines that can choose their context (`sized_for`: the
    in-process vLLM engine, up to the model's own limit); any other engine as it is (a server's
    context is the server's), and a prompt that does not fit comes back refused (`judge_error`)."""
    sized_for = getattr(judge, "sized_for", None)
    return sized_for(requests, sampling.max_tokens) if sized_for is not None and requests else judge


def judge_pairs(judge: ChatEngine, pairs: list[tuple[list[Message], list[Message]]], sampling: Sampling,
                seeds: list[int], prompts: Prompts = PACKAGED) -> list[Judgment]:
    """Judges every (first, second) pair in both orders, all in one batched call to an engine sized
    for the longest prompt. Identical conversations are a tie without asking the judge."""
    asked = [i for i, (a, b) in enumerate(pairs) if a != b]
    requests = ([judge_prompt(*pairs[i], prompts) for i in asked]
                + [judge_prompt(pairs[i][1], pairs[i][0], prompts) for i in asked])
    outs = sized_judge(judge, requests, sampling).chat(requests, sampling, [seeds[i] for i in asked] * 2) if asked else []
    forward = dict(zip(asked, outs[: len(asked)]))
    swapped = dict(zip(asked, outs[len(asked):]))
    results = []
    for i in range(len(pairs)):
        if i not in forward:
            results.append(Judgment("", "", "C", "C", "tie", "identical"))
            continue
        vf, vs = parse_verdict(forward[i].text), parse_verdict(swapped[i].text)  # a refusal's text is empty
        preferred, reason = combine(vf, vs)
        errors = {output_error(forward[i], vf), output_error(swapped[i], vs)} - {None}
        if errors:
            preferred, reason = None, next(r for r in ERROR_REASONS if r in errors)
        results.append(Judgment(_text(forward[i]), _text(swapped[i]), vf, vs, preferred, reason))
    return results


def _text(gen: Generation) -> str:
    return gen.error if gen.finish_reasons[0] == "error" and gen.error else gen.text
