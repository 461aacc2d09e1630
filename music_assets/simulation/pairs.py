"""Assembles MUSIC pairs (chosen vs rejected conversation) from committed simulation turns."""

from __future__ import annotations

from collections import defaultdict

from music_assets.common.hashing import stable_hash


def assemble_pairs(contexts: list[dict], rows: list[dict], turns: int) -> list[dict]:
    """One pair per context whose T turns are complete in both branches. `rows` are
    simulated_branches rows (with the run's generation_key, prompt_version, models, settings)."""
    by_context = defaultdict(list)
    for row in rows:
        by_context[row["context_id"]].append(row)
    pairs = []
    for ctx in contexts:
        ctx_rows = sorted(by_context.get(ctx["context_id"], []), key=lambda r: (r["turn"], r["branch"]))
        if not ctx_rows:
            continue
        c = ctx_rows[0]["contrast_turn"]
        shared = [r for r in ctx_rows if r["branch"] == "shared"]
        chosen = [r for r in ctx_rows if r["branch"] == "chosen"]
        rejected = [r for r in ctx_rows if r["branch"] == "rejected"]
        if len(shared) + len(chosen) != turns or len(chosen) != len(rejected):
            continue  # unfinished or dropped context
        prefix = list(ctx["messages"]) + _messages(shared)
        chosen_conv, rejected_conv = prefix + _messages(chosen), prefix + _messages(rejected)
        first = ctx_rows[0]
        pairs.append(
            {
                "source": ctx["source"],
                "pair_id": f"music/{ctx['context_id']}",
                "context_id": ctx["context_id"],
                "seed_pair_id": ctx["pair_id"],
                "k": ctx["k"],
                "turns": turns,
                "contrast_turn": c,
                "chosen": chosen_conv,
                "rejected": rejected_conv,
                # the user message at turn c is shared too
                "prefix_messages": len(prefix) + 1,
                "original_instruction": rejected[0]["user_message"],
                "modified_instruction": rejected[0]["modified_instruction"],
                "generation_key": first["generation_key"],
                "prompt_version": first["prompt_version"],
                "models": first["models"],
                "sampling": first["settings"],
                "content_hash": stable_hash({"chosen": chosen_conv, "rejected": rejected_conv}),
            }
        )
    return pairs


def assistant_turns_differing(pair: dict) -> int:
    """Assistant turns from the contrast turn on in which rejected differs from chosen."""
    start = pair["prefix_messages"]
    chosen = [m["content"] for m in pair["chosen"][start:] if m["role"] == "assistant"]
    rejected = [m["content"] for m in pair["rejected"][start:] if m["role"] == "assistant"]
    return sum(a != b for a, b in zip(chosen, rejected))


def _messages(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        out += [{"role": "user", "content": r["user_message"]}, {"role": "assistant", "content": r["assistant_message"]}]
    return out
