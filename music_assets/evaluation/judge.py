"""Pairwise LLM judging with position swap: two conversations are judged twice, once in each order,
and a verdict counts only when both orders agree (MT-Bench's rule against position bias).

The judge answers `[[A]]`, `[[B]]` or `[[C]]` (tie) on its last line (prompts/judge_pairwise.txt).
An answer with none of them is a *parse failure*: it is kept (raw text and reason) and the pair
becomes a tie, so the report can state how often the judge could not be read instead of silently
dropping those pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from music_assets.common.engines import ChatEngine, Generation, Message, Sampling
from music_assets.simulation.prompts import PACKAGED, Prompts

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


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

    raw_forward: str  # first shown as A
    raw_swapped: str  # second shown as A
    verdict_forward: str | None  # 'A' | 'B' | 'C' | None (unparsed)
    verdict_swapped: str | None
    preferred: str  # 'first' | 'second' | 'tie'
    reason: str  # consistent | judge_tie | inconsistent | unparsed | judge_error | identical

    @property
    def unparsed_outputs(self) -> int:
        return (self.verdict_forward is None) + (self.verdict_swapped is None) if self.reason != "identical" else 0


def combine(forward: str | None, swapped: str | None) -> tuple[str, str]:
    """(preferred, reason) from the two verdicts; in the swapped call 'A' is the second conversation."""
    if forward is None or swapped is None:
        return "tie", "unparsed"
    as_first = {"A": "first", "B": "second", "C": "tie"}[forward]
    as_swapped = {"A": "second", "B": "first", "C": "tie"}[swapped]
    if as_first == as_swapped:
        return as_first, "judge_tie" if as_first == "tie" else "consistent"
    return "tie", "inconsistent"


def judge_pairs(judge: ChatEngine, pairs: list[tuple[list[Message], list[Message]]], sampling: Sampling,
                seeds: list[int], prompts: Prompts = PACKAGED) -> list[Judgment]:
    """Judges every (first, second) pair in both orders, all in one batched engine call. Identical
    conversations are a tie without asking the judge."""
    asked = [i for i, (a, b) in enumerate(pairs) if a != b]
    requests = ([judge_prompt(*pairs[i], prompts) for i in asked]
                + [judge_prompt(pairs[i][1], pairs[i][0], prompts) for i in asked])
    outs = judge.chat(requests, sampling, [seeds[i] for i in asked] * 2) if asked else []
    forward = dict(zip(asked, outs[: len(asked)]))
    swapped = dict(zip(asked, outs[len(asked):]))
    results = []
    for i in range(len(pairs)):
        if i not in forward:
            results.append(Judgment("", "", "C", "C", "tie", "identical"))
            continue
        f, s = _text(forward[i]), _text(swapped[i])
        vf, vs = parse_verdict(f), parse_verdict(s)
        preferred, reason = combine(vf, vs)
        if reason == "unparsed" and "error" in (forward[i].finish_reasons[0], swapped[i].finish_reasons[0]):
            reason = "judge_error"  # the engine refused the request (e.g. the prompt is too long)
        results.append(Judgment(f, s, vf, vs, preferred, reason))
    return results


def _text(gen: Generation) -> str:
    return gen.error if gen.finish_reasons[0] == "error" and gen.error else gen.text
