"""Scores a reward-model checkpoint on evaluation pairs and Best-of-N candidates (no Dagster):
batched, length-sorted, under `torch.inference_mode()`. The sequences scored together share a
prefix (a pair's conversation before its answers, the N candidates' conversation so far); for
decoder reward models that prefix runs once (`prefix_scoring.grouped_scores`), for encoders and
short prefixes every sequence runs whole. Both paths give the same rewards; each caller reports
which path scored how many sequences."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from music_assets.evaluation.prefix_scoring import group_paths, grouped_scores
from music_assets.training.rm_data import PairEncoder
from music_assets.training.train_rm import METADATA_FILE


def load_checkpoint(folder: str | Path, device: str = "cpu", attn_implementation: str | None = None):
    """(model, tokenizer, encoder) of a checkpoint written by train_rm, with its own rendering
    and max length (from music_metadata.json), on `device` (the compute resource's: `cuda` is the
    current GPU), with transformers' default attention unless `attn_implementation` names one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / METADATA_FILE).read_text())
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(folder, **extra).to(device)
    tok = AutoTokenizer.from_pretrained(folder)
    template = meta["config"].get("chat_template")
    if template and (folder / "music_chat_template.jinja").exists():
        template = (folder / "music_chat_template.jinja").read_text()
    return model, tok, PairEncoder(tok, meta["config"]["max_length"], template)


class ConversationScorer:
    """Groups of conversations -> their rewards under a checkpoint. A group is what is compared
    (Best-of-N's N candidates for one conversation), so its members share their prefix; `paths`
    counts the sequences each scoring path took. A conversation longer than the checkpoint's max
    length keeps its end (the part being compared)."""

    def __init__(self, folder: str | Path, device: str = "cpu", attn_implementation: str | None = None):
        self.model, self.tok, self.encoder = load_checkpoint(folder, device, attn_implementation)
        self.paths: Counter = Counter()

    def __call__(self, groups: list[list[list[dict]]]) -> list[list[float]]:
        encoded = [[self.encoder.encode_one(c) for c in group] for group in groups]
        scores, paths = grouped_scores(self.model, encoded, self.tok.pad_token_id)
        self.paths.update(paths)
        return scores


def conversation_scorer(folder: str | Path, device: str = "cpu", attn_implementation: str | None = None):
    return ConversationScorer(folder, device, attn_implementation)


def score_rows(model, tok, encoder: PairEncoder, rows: list[dict]) -> tuple[list[dict], Counter, Counter]:
    """Rewards for evaluation rows ({eval_set, item_id, subset, user_turns, chosen, rejected}),
    with the sequences each scoring path took (see the module docstring). Rows that cannot be
    scored are skipped and counted by reason, never silently dropped: an empty response or a
    missing side."""
    skipped: Counter = Counter()
    kept, encoded = [], []
    for row in rows:
        reason = _invalid(row)
        if reason:
            skipped[reason] += 1
            continue
        kept.append(row)
        encoded.append(encoder.encode(row["chosen"], row["rejected"], row["item_id"]))
    groups = [[p.chosen, p.rejected] for p in encoded]
    by_group = group_paths(model, groups)
    scores, paths = grouped_scores(model, groups, tok.pad_token_id, by_group)
    out = [{"eval_set": r["eval_set"], "item_id": r["item_id"], "subset": r.get("subset"),
            "user_turns": r["user_turns"], "r_chosen": c, "r_rejected": j, "scored_by": path}
           for r, (c, j), path in zip(kept, scores, by_group)]
    return out, skipped, paths


def _invalid(row: dict) -> str | None:
    for side in ("chosen", "rejected"):
        msgs = row.get(side)
        if not msgs:
            return f"missing_{side}"
        if msgs[-1]["role"] == "assistant" and not (msgs[-1]["content"] or "").strip():
            return "empty_response"
    return None
