"""Scores a reward-model checkpoint on evaluation pairs (no Dagster): batched, length-sorted,
under `torch.inference_mode()` (see `trainer.pairwise_scores`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from music_assets.training.rm_data import PairEncoder
from music_assets.training.trainer import pairwise_scores, sequence_scores
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


def conversation_scorer(folder: str | Path, device: str = "cpu", attn_implementation: str | None = None):
    """conversations -> rewards under a checkpoint: batched, length-sorted, inference mode; a
    conversation longer than the checkpoint's max length keeps its end (the part being compared)."""
    model, tok, encoder = load_checkpoint(folder, device, attn_implementation)

    def score(conversations: list[list[dict]]) -> list[float]:
        return sequence_scores(model, [encoder.encode_one(c) for c in conversations], tok.pad_token_id)

    return score


def score_rows(model, tok, encoder: PairEncoder, rows: list[dict], batch_size: int | None = None) -> tuple[list[dict], Counter]:
    """Rewards for evaluation rows ({eval_set, item_id, subset, user_turns, chosen, rejected}).
    Rows that cannot be scored are skipped and counted by reason, never silently dropped:
    an empty response or a missing side."""
    skipped: Counter = Counter()
    kept, encoded = [], []
    for row in rows:
        reason = _invalid(row)
        if reason:
            skipped[reason] += 1
            continue
        kept.append(row)
        encoded.append(encoder.encode(row["chosen"], row["rejected"], row["item_id"]))
    scores = pairwise_scores(model, encoded, tok.pad_token_id, batch_size)
    out = [{"eval_set": r["eval_set"], "item_id": r["item_id"], "subset": r.get("subset"),
            "user_turns": r["user_turns"], "r_chosen": c, "r_rejected": j} for r, (c, j) in zip(kept, scores)]
    return out, skipped


def _invalid(row: dict) -> str | None:
    for side in ("chosen", "rejected"):
        msgs = row.get(side)
        if not msgs:
            return f"missing_{side}"
        if msgs[-1]["role"] == "assistant" and not (msgs[-1]["content"] or "").strip():
            return "empty_response"
    return None
