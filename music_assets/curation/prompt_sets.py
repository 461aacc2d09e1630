"""One Best-of-N context per prompt in a prompt-only evaluation set (no Dagster, no database).

Why: public prompt sets repeat their prompts. UltraInteract has a row per answer, several per
instruction (all sharing the instruction's `parent_id`); Anthropic HH has conversations that open
with the same human turn. A prompt kept twice would be continued twice by Best-of-N and weigh
twice in its win rate, and two items would answer to one id. So a prompt-only row is dropped when
an earlier row of its set had the same id (UltraInteract's `parent_id`, MT-Bench's
`question_id`) or the same user turns. The first row is the one kept: appending rows to a file
never changes which row stands for a prompt, so item ids and the seeded Best-of-N sample stay put.
Pairs (RewardBench, LLMBar) are left alone: their dedup is the training data's business.
"""

from __future__ import annotations


def unique_prompts(rows: list[dict]) -> tuple[list[dict], int]:
    """`rows` (ingested rows of one set, in row order: `kind`, `original_id`, `context_hash`)
    without the repeated prompts, and how many were dropped."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for row in rows:
        if row["kind"] != "prompts":
            kept.append(row)
            continue
        keys = {("text", row["context_hash"])} | ({("id", row["original_id"])} if row["original_id"] else set())
        if not keys & seen:  # only a kept row claims its id and text: a dropped one stands for nothing
            kept.append(row)
            seen |= keys
    return kept, len(rows) - len(kept)
