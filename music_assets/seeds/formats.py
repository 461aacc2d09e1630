"""Normalizes one raw preference record into a chosen/rejected pair of message lists.

Every supported input shape ends up as the same thing: two conversations (lists of
`{"role", "content"}`) that share a prefix and end with an assistant turn. Anything that cannot be
normalized raises `RowRejected` with the field at fault, so the caller can quarantine the row with
a reason instead of dropping it or crashing the run.

Formats (auto-detected from a record's keys, or named in config):
- `conversational`: Skywork/TRL `chosen` and `rejected` message lists (implicit prompt), optionally
  with an explicit `prompt` message list in front.
- `hh_rlhf`: Anthropic HH-RLHF transcripts, `chosen`/`rejected` strings of
  `\\n\\nHuman: ...\\n\\nAssistant: ...`.
- `prompt_chosen_rejected`: `prompt` (string or message list) with `chosen`/`rejected` completions
  (strings or message lists); RewardBench rows (`subset`) and UltraFeedback slices take this form.
- `llmbar`: `input`, `output_1`, `output_2`, `label` (1 or 2 names the better output).
- `prompts`: prompt-only records (MT-Bench `turns`): user turns without responses, kept as
  evaluation contexts (`kind = 'prompts'`, `rejected` empty), never as training pairs.
- `hh_prompts`: the Best-of-N prompts the paper drew from Anthropic HH: an HH-RLHF row reduced to
  the first human turn of its `chosen` transcript (the rest of the conversation is the answer
  under test, so it is dropped). Prompt-only, like `prompts`.
- `ultrainteract`: UltraInteract prompts, prompt-only as in the paper: the `instruction` of an
  `openbmb/UltraInteract_sft` row, or the first (user) turn of an `UltraInteract_pair` row's
  `trajectory`. Its id is the row's `parent_id`, which every row of one instruction shares, so
  the evaluation set keeps one prompt per parent (music_assets/curation/prompt_sets.py).
The two Best-of-N formats are never auto-detected: an HH row is a training pair unless a set says
otherwise, and an UltraInteract_pair row has pair-like `chosen`/`rejected` strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
FORMATS = ("conversational", "hh_rlhf", "prompt_chosen_rejected", "llmbar", "prompts", "hh_prompts", "ultrainteract")
DEFAULT_MAX_MESSAGE_CHARS = 20_000

# Keys we understand per format; any other key is kept in the `extra` column as JSON.
_ID_KEYS = ("id", "question_id", "source_index", "prompt_id")


class RowRejected(Exception):
    """A record that cannot be normalized. `rule` is a short stable class for counting (the
    quarantine metadata groups by it), `reason` the human sentence, `field` the field at fault."""

    def __init__(self, rule: str, reason: str, field: str = ""):
        super().__init__(reason)
        self.rule = rule
        self.reason = reason
        self.field = field


@dataclass
class NormalizedPair:
    kind: str  # "pair" or "prompts"
    format: str
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    original_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise RowRejected("not_an_object", f"record is a {type(record).__name__}, expected a JSON object", "")
    keys = set(record)
    if {"input", "output_1", "output_2"} <= keys:
        return "llmbar"
    if "turns" in keys and "chosen" not in keys:
        return "prompts"
    if "prompt" in keys and record.get("prompt") not in (None, [], ""):
        return "prompt_chosen_rejected"
    if "chosen" in keys or "rejected" in keys:
        sample = record.get("chosen") if "chosen" in keys else record.get("rejected")
        if isinstance(sample, str) and ("\n\nHuman:" in sample or sample.startswith("Human:")):
            return "hh_rlhf"
        if isinstance(sample, str):
            raise RowRejected("unrecognized_shape", "`chosen`/`rejected` are strings but there is no `prompt` and no HH-RLHF transcript markers", "chosen")
        return "conversational"
    raise RowRejected("unrecognized_shape", f"unrecognized record shape (keys: {', '.join(sorted(map(str, keys))) or 'none'})", "")


def normalize(record: Any, fmt: str = "auto", max_chars: int = DEFAULT_MAX_MESSAGE_CHARS) -> NormalizedPair:
    """Returns the normalized pair, or raises `RowRejected` naming the field and the reason."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if not isinstance(record, dict):
        raise RowRejected("not_an_object", f"record is a {type(record).__name__}, expected a JSON object", "")
    if fmt not in FORMATS:
        raise ValueError(f"unknown seed format {fmt!r}; expected one of {FORMATS} or 'auto'")
    pair = _PARSERS[fmt](record)
    pair.original_id = pair.original_id or _original_id(record)  # a parser may name a better id
    known = _KNOWN_KEYS[fmt] | set(_ID_KEYS)
    pair.extra = {k: v for k, v in record.items() if k not in known}
    for side in ("chosen", "rejected"):
        _validate_messages(getattr(pair, side), side, max_chars, needs_assistant_end=pair.kind == "pair")
    if pair.kind == "pair" and pair.chosen == pair.rejected:
        raise RowRejected("identical_sides", "chosen is identical to rejected", "rejected")
    return pair


# --- one parser per format -------------------------------------------------------------------


def _conversational(record: dict) -> NormalizedPair:
    prompt = _messages(record["prompt"], "prompt") if record.get("prompt") else []
    chosen = _messages(_require(record, "chosen"), "chosen")
    rejected = _messages(_require(record, "rejected"), "rejected")
    return NormalizedPair("pair", "conversational", prompt + chosen, prompt + rejected)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def _hh_rlhf(record: dict) -> NormalizedPair:
    chosen = _parse_transcript(_require(record, "chosen"), "chosen")
    rejected = _parse_transcript(_require(record, "rejected"), "rejected")
    return NormalizedPair("pair", "hh_rlhf", chosen, rejected)


def _parse_transcript(text: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(text, str):
        raise RowRejected("wrong_type", f"`{name}` must be an HH-RLHF transcript string, found {type(text).__name__}", name)
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowRejected("unrecognized_shape", f"`{name}` has text before the first 'Human:' marker", name)
    roles = {"Human": "user", "Assistant": "assistant"}
    # split() with one group gives [lead, role, content, role, content, ...]
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _prompt_chosen_rejected(record: dict) -> NormalizedPair:
    prompt_value = _require(record, "prompt")
    if isinstance(prompt_value, str):
        prompt = [{"role": "user", "content": prompt_value}]
    else:
        prompt = _messages(prompt_value, "prompt")
    chosen = _completion(_require(record, "chosen"), "chosen")
    rejected = _completion(_require(record, "rejected"), "rejected")
    return NormalizedPair("pair", "prompt_chosen_rejected", prompt + chosen, prompt + rejected)


def _completion(value: Any, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _messages(value, name)


def _llmbar(record: dict) -> NormalizedPair:
    label = _require(record, "label")
    if label not in (1, 2, "1", "2"):
        raise RowRejected("bad_label", f"`label` must be 1 or 2, found {label!r}", "label")
    better, worse = ("output_1", "output_2") if int(label) == 1 else ("output_2", "output_1")
    prompt = [{"role": "user", "content": _string(_require(record, "input"), "input")}]
    chosen = [{"role": "assistant", "content": _string(_require(record, better), better)}]
    rejected = [{"role": "assistant", "content": _string(_require(record, worse), worse)}]
    return NormalizedPair("pair", "llmbar", prompt + chosen, prompt + rejected)


def _prompts(record: dict) -> NormalizedPair:
    turns = _require(record, "turns")
    if not isinstance(turns, list) or not turns:
        raise RowRejected("wrong_type", "`turns` must be a non-empty list of user messages", "turns")
    users = [{"role": "user", "content": _string(t, f"turns[{i}]")} for i, t in enumerate(turns)]
    return NormalizedPair("prompts", "prompts", users, [])


def _hh_prompts(record: dict) -> NormalizedPair:
    turns = _parse_transcript(_require(record, "chosen"), "chosen")
    if not turns or turns[0]["role"] != "user":
        raise RowRejected("unrecognized_shape", "`chosen` does not start with a 'Human:' turn", "chosen")
    return NormalizedPair("prompts", "hh_prompts", turns[:1], [])


def _ultrainteract(record: dict) -> NormalizedPair:
    if record.get("trajectory") is not None:  # UltraInteract_pair: the first turn is the instruction
        trajectory, name = record["trajectory"], "trajectory[0].value"
        if not isinstance(trajectory, list) or not trajectory:
            raise RowRejected("wrong_type", "`trajectory` must be a non-empty list of {from, value} turns", "trajectory")
        first = trajectory[0] if isinstance(trajectory[0], dict) else {}
        if first.get("from") != "user":
            raise RowRejected("unrecognized_shape", f"`trajectory[0].from` must be 'user', found {first.get('from')!r}",
                              "trajectory[0].from")
        text = _string(first.get("value"), name)
    else:  # UltraInteract_sft
        name = "instruction"
        text = _string(_require(record, name), name)
    if not text.strip():
        raise RowRejected("empty_message", f"`{name}` is empty", name)
    parent = record.get("parent_id")
    if parent is not None and not isinstance(parent, (str, int)):
        raise RowRejected("wrong_type", f"`parent_id` must be a string, found {type(parent).__name__}", "parent_id")
    return NormalizedPair("prompts", "ultrainteract", [{"role": "user", "content": text}], [],
                          original_id=str(parent) if parent not in (None, "") else None)


_PARSERS = {
    "conversational": _conversational,
    "hh_rlhf": _hh_rlhf,
    "prompt_chosen_rejected": _prompt_chosen_rejected,
    "llmbar": _llmbar,
    "prompts": _prompts,
    "hh_prompts": _hh_prompts,
    "ultrainteract": _ultrainteract,
}
_KNOWN_KEYS = {
    "conversational": {"prompt", "chosen", "rejected"},
    "hh_rlhf": {"chosen", "rejected"},
    "prompt_chosen_rejected": {"prompt", "chosen", "rejected"},
    "llmbar": {"input", "output_1", "output_2", "label"},
    "prompts": {"turns"},
    "hh_prompts": {"chosen", "rejected"},
    # the answers and the rest of a trajectory are not part of a prompt-only item; `task` and
    # `dataset` (Coding / Math_CoT / ..., and the benchmark it came from) stay in `extra`
    "ultrainteract": {"instruction", "response", "trajectory", "chosen", "rejected", "parent_id"},
}


# --- shared validation -----------------------------------------------------------------------


def _require(record: dict, key: str) -> Any:
    if key not in record or record[key] is None:
        raise RowRejected("missing_field", f"missing field `{key}`", key)
    return record[key]


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowRejected("wrong_type", f"`{name}` must be a string, found {type(value).__name__}", name)
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowRejected("wrong_type", f"`{name}` must be a list of messages, found {type(value).__name__}", name)
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise RowRejected("wrong_type", f"`{where}` must be an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise RowRejected("missing_field", f"`{where}.role` is missing", where)
        if not isinstance(content, str):
            raise RowRejected("wrong_type", f"`{where}.content` must be a string, found {type(content).__name__}", where)
        out.append({"role": role.strip().lower(), "content": content})
    return out


def _validate_messages(messages: list[dict], side: str, max_chars: int, needs_assistant_end: bool) -> None:
    if not messages:
        if needs_assistant_end or side == "chosen":
            raise RowRejected("empty_message", f"`{side}` has no messages", side)
        return
    for i, m in enumerate(messages):
        where = f"{side}[{i}]"
        if m["role"] not in ROLES:
            raise RowRejected("unknown_role", f"unknown role {m['role']!r} in `{where}` (expected system, user or assistant)", where)
        if not m["content"].strip():
            raise RowRejected("empty_message", f"empty message in `{where}` ({m['role']})", where)
        if _has_invalid_utf8(m["content"]):
            raise RowRejected("invalid_utf8", f"invalid UTF-8 in `{where}`", where)
        if len(m["content"]) > max_chars:
            raise RowRejected("message_too_long", f"message too long in `{where}`: {len(m['content'])} chars > {max_chars}", where)
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        # Prompt-only rows are consecutive user turns; conversations alternate from a user turn.
        expected = "user" if i % 2 == 0 or not needs_assistant_end else "assistant"
        if m["role"] != expected:
            offset = len(messages) - len(body)
            raise RowRejected(
                "roles_not_alternating",
                f"roles do not alternate: `{side}[{i + offset}]` is {m['role']}, expected {expected}",
                f"{side}[{i + offset}]",
            )
    if needs_assistant_end and messages[-1]["role"] != "assistant":
        raise RowRejected("no_assistant_end", f"`{side}` does not end with an assistant turn", side)


def _has_invalid_utf8(text: str) -> bool:
    # The reader decodes with surrogateescape, so undecodable bytes arrive as U+DC80..U+DCFF; a JSON
    # "\\ud83d" escape without its pair is a lone surrogate too. Neither is storable text.
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _original_id(record: dict) -> str | None:
    for key in _ID_KEYS:
        if record.get(key) is not None:
            return str(record[key])
    return None
