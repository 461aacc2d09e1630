"""Multi-turn Best-of-N: does a reward model pick better answers turn after turn?

From each evaluation context (a conversation that ends with a user request), for T turns: the
policy engine samples N candidate answers, the reward model under test scores each candidate
conversation and keeps the best one, and the next user message comes from the data set when it
has one (MT-Bench's second question) or else from the user simulator. The baseline and the MUSIC
reward models run from the same contexts with the same sampling seeds, so as long as they pick
the same candidates their conversations stay identical; a judge then compares the two final
conversations (music_assets/evaluation/judge.py).

Speed: at every turn all live conversations (every context, N and reward model) go to the policy
engine in one batched call with `n` samples per request; requests that are identical (both reward
models still on the same conversation) are sent once. Each reward model scores all its candidates
of a turn in one batched, length-sorted pass.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from music_assets.common.engines import ChatEngine, Message
from music_assets.common.hashing import stable_hash
from music_assets.evaluation.config import EvaluationConfig
from music_assets.evaluation.judge import Judgment, judge_pairs
from music_assets.simulation.prompts import PACKAGED, Prompts
from music_assets.common.generation import BatchGenerator, Failure, GenerationStats, basic_validator
from music_assets.simulation.validators import user_validator

# groups of conversations (one group: the N candidates for one conversation) -> their rewards
Scorer = Callable[[list[list[list[Message]]]], list[list[float]]]


@dataclass(frozen=True)
class EvalContext:
    context_id: str
    source: str  # 'heldout_seed' or the evaluation set's name
    messages: list[Message]  # ends with a user request
    scripted_users: tuple[str, ...] = ()  # the data set's own next user messages, used before the simulator

    def __post_init__(self):
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError(f"context {self.context_id!r}: a Best-of-N context must end with a user message")


@dataclass
class Conversation:
    """One context continued under one reward model with one N."""

    ctx: EvalContext
    variant: str
    n: int
    messages: list[Message]
    picks: list[dict] = field(default_factory=list)  # per turn: the candidates, their rewards, the index kept
    dropped: str | None = None  # why it could not be finished


def run_best_of_n(contexts: list[EvalContext], scorers: dict[str, Scorer], policy: ChatEngine, user: ChatEngine,
                  settings: EvaluationConfig, log: Callable[[str], None] = print,
                  prompts: Prompts = PACKAGED) -> tuple[list[Conversation], GenerationStats]:
    stats = GenerationStats()
    gen = BatchGenerator(settings.max_attempts, stats)
    runs = [Conversation(ctx, v, n, list(ctx.messages)) for ctx in contexts for n in settings.best_of_n for v in scorers]
    for turn in range(1, settings.turns + 1):
        if turn > 1:
            _next_user_messages([r for r in runs if r.dropped is None], turn, user, settings, gen, prompts)
        live = [r for r in runs if r.dropped is None]
        candidates = _candidates(live, turn, policy, settings, stats)
        for variant, scorer in scorers.items():
            mine = [(r, cands) for r, cands in zip(live, candidates) if r.variant == variant and cands]
            groups = [[r.messages + [{"role": "assistant", "content": text}] for text, _ in cands] for r, cands in mine]
            for (r, cands), scores in zip(mine, scorer(groups) if groups else []):
                best = max(range(len(cands)), key=lambda i: (scores[i], -i))  # first of equal rewards
                r.picks.append({"turn": turn, "candidates": [text for text, _ in cands], "rewards": scores,
                                "picked": best, "cut": cands[best][1] == "length"})
                r.messages.append({"role": "assistant", "content": cands[best][0]})
        log(f"best-of-n turn {turn}/{settings.turns}: {sum(r.dropped is None for r in runs)} of {len(runs)} "
            f"conversations live, {stats.completion_tokens} tokens ({stats.tokens_per_second:.0f} tok/s)")
    return runs, stats


def _seed(settings: EvaluationConfig, ctx: EvalContext, n: int, turn: int, stage: str) -> int:
    """The same for every reward model: identical conversations get identical samples."""
    return int(stable_hash([settings.seed, ctx.context_id, n, turn, stage])[:8], 16)


def _next_user_messages(live: list[Conversation], turn: int, user: ChatEngine, settings: EvaluationConfig,
                        gen: BatchGenerator, prompts: Prompts) -> None:
    simulated = []
    for r in live:
        if turn - 2 < len(r.ctx.scripted_users):
            r.messages.append({"role": "user", "content": r.ctx.scripted_users[turn - 2]})
        else:
            simulated.append(r)
    unique = _unique(simulated, lambda r: (r.ctx.context_id, r.n, _key(r.messages)))
    results = gen.run(user, [prompts.user_simulator_messages(group[0].messages) for group in unique],
                      settings.user_sampling, [_seed(settings, g[0].ctx, g[0].n, turn, "user") for g in unique],
                      [user_validator(g[0].messages) for g in unique])
    for group, result in zip(unique, results):
        for r in group:
            if isinstance(result, Failure):
                r.dropped = f"user_simulator:{result.reason}"
            else:
                r.messages.append({"role": "user", "content": result.text})


def _candidates(live: list[Conversation], turn: int, policy: ChatEngine, settings: EvaluationConfig,
                stats: GenerationStats) -> list[list[tuple[str, str]]]:
    """The usable candidates (text, finish reason) of every live conversation, one batched call per
    attempt. Empty answers, engine refusals and leaked template markers are not candidates; answers
    cut at max_tokens are (the reward model judges them) and the pick records it. A conversation
    with no usable candidate after `max_attempts` is dropped with the reason."""
    unique = _unique(live, lambda r: (r.ctx.context_id, r.n, _key(r.messages)))
    found: dict[int, list[tuple[str, str]]] = {}
    reasons: dict[int, str] = {}
    pending = list(range(len(unique)))
    for attempt in range(settings.max_attempts):
        if not pending:
            break
        started = time.perf_counter()
        outs = policy.chat([unique[i][0].messages for i in pending],
                           [replace(settings.policy_sampling, n=unique[i][0].n) for i in pending],
                           [(_seed(settings, unique[i][0].ctx, unique[i][0].n, turn, "policy") + 7919 * attempt) % 2**31
                            for i in pending])
        stats.generation_seconds += time.perf_counter() - started
        stats.calls += 1
        stats.requests += len(pending)
        still = []
        for i, out in zip(pending, outs):
            stats.completion_tokens += out.completion_tokens
            usable = []
            for text, finish in zip(out.texts, out.finish_reasons):
                reason, cleaned = basic_validator(text, "stop" if finish == "length" else finish)
                if reason is None:
                    usable.append((cleaned, finish))
                else:
                    reasons[i] = reason
            if usable:
                found[i] = usable
            else:
                still.append(i)
        pending = still
    result = {}
    for i, group in enumerate(unique):
        for r in group:
            if i in found:
                result[id(r)] = found[i]
            else:
                r.dropped = f"policy:{reasons.get(i, 'no_candidates')}"
                result[id(r)] = []
    return [result[id(r)] for r in live]


def _unique(runs: list[Conversation], key) -> list[list[Conversation]]:
    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return list(groups.values())


def _key(messages: list[Message]) -> str:
    return json.dumps(messages, sort_keys=True)


def judge_best_of_n(runs: list[Conversation], judge: ChatEngine, settings: EvaluationConfig,
                    first: str = "baseline", second: str = "music", prompts: Prompts = PACKAGED) -> list[dict]:
    """One row per (context, N): the judge's order-swapped comparison of the two reward models'
    final conversations and the outcome from `second`'s side (win | tie | loss). A context that
    either model could not finish gets no outcome, only its drop reason; a pair the judge could not
    judge gets no outcome either, only its error reason (judge.ERROR_REASONS)."""
    by = {(r.ctx.context_id, r.n, r.variant): r for r in runs}
    keys = sorted({(r.ctx.context_id, r.n) for r in runs}, key=lambda k: (k[1], k[0]))
    judged, rows = [], []
    for cid, n in keys:
        a, b = by[(cid, n, first)], by[(cid, n, second)]
        row = {"context_id": cid, "source": a.ctx.source, "n": n, "outcome": None,
               "drop_reason": a.dropped or b.dropped, "reason": None, "verdict_forward": None,
               "verdict_swapped": None, "raw_forward": None, "raw_swapped": None}
        rows.append(row)
        if not row["drop_reason"]:
            judged.append((row, a, b))
    verdicts: list[Judgment] = judge_pairs(
        judge, [(a.messages, b.messages) for _, a, b in judged], settings.judge_sampling,
        [_seed(settings, a.ctx, a.n, 0, "judge") for _, a, _ in judged], prompts)
    for (row, _, _), j in zip(judged, verdicts):
        row.update(outcome={"second": "win", "first": "loss", "tie": "tie", None: None}[j.preferred], reason=j.reason,
                   verdict_forward=j.verdict_forward, verdict_swapped=j.verdict_swapped,
                   raw_forward=j.raw_forward, raw_swapped=j.raw_swapped)
    return rows
