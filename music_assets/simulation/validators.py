"""The simulation's checks on generated text: which outputs are bad, and why.

Bad output (empty, cut at max tokens, a user simulator that writes as the assistant, a rewrite
that returns the request unchanged, a visible message that shows the rejected branch's private
note or rewrite) is retried with a new seed; after `max_attempts` the context is dropped with the
validator's reason. The text checks (`shows_private_note`, `shows_private_rewrite`) are also what
music_pairs' blocking check runs on the finished pairs, and Best-of-N's simulated users pass
`user_validator`; so they live apart from the loop that uses them.
"""

from __future__ import annotations

import re

from music_assets.common.engines import Message
from music_assets.common.generation import Validator, basic_validator

_ROLE_LABEL = re.compile(r"^\s*(?:\*\*)?(user|the user|human|me)\s*(?:\*\*)?\s*:\s*", re.IGNORECASE)
_ASSISTANT_LABEL = re.compile(r"^\s*(?:\*\*)?(assistant|ai|bot|chatbot)\s*(?:\*\*)?\s*:", re.IGNORECASE | re.MULTILINE)
_REWRITE_LABEL = re.compile(r"^\s*(?:rewritten|modified|new)?\s*(?:request|instruction)?\s*:\s*", re.IGNORECASE)


def shows_private_note(text: str, markers: tuple[str, ...]) -> bool:
    """Whether visible `text` repeats the rejected assistant's private note. `markers` are the
    active template's own phrases (`Prompts.private_note_markers`), so an edited note is checked
    as strictly as the packaged one. SmolLM2-135M sometimes copies the note into its answer, or
    answers with the note alone. Words only: case, punctuation and spacing ignored."""
    words = f" {_normalize(text)} "
    return any(f" {marker} " in words for marker in markers)


# Words too common to make a phrase of the note recognisable (a 5-word window of the note is a
# marker only with at least 3 other words of 4+ letters): "the rest of the conversation" also
# occurs in honest answers, "respond to the following version" does not.
_COMMON = frozenset("this that with what your from have will been they them then than into only just also each "
                    "more most some such very when which while would could should about after before".split())
_MARKER_WORDS, _MARKER_CONTENT_WORDS = 5, 3


def note_markers(template: str) -> tuple[str, ...]:
    """The phrases of a contrastive-assistant template that no honest answer would contain: its
    label (the words before the first comma or colon of a segment that opens a parenthesis or
    bracket, e.g. "private note") and every 5-word window of its fixed text with 3 or more
    uncommon words. Placeholders (`{modified}`) and sentence punctuation split the text: a window
    never spans them.

    Why derived, not a fixed list: an edited note (prompts_dir) with other words would otherwise
    turn the leak and echo checks off without a word."""
    markers: list[str] = []
    for segment in re.split(r"\{\w+\}", template):
        label = re.match(r"\s*[(\[]\s*([^,:.)\]]{3,40})[,:]", segment)
        if label and 1 <= len(_normalize(label.group(1)).split()) <= 3:
            markers.append(_normalize(label.group(1)))
        for clause in re.split(r"[.!?;:()\[\]]", segment):
            words = _normalize(clause).split()
            for i in range(len(words) - _MARKER_WORDS + 1):
                window = words[i: i + _MARKER_WORDS]
                if sum(len(w) >= 4 and w not in _COMMON for w in window) >= _MARKER_CONTENT_WORDS:
                    markers.append(" ".join(window))
    return tuple(dict.fromkeys(markers))


def assistant_validator(private_note_markers: tuple[str, ...] | None = None) -> Validator:
    """`private_note_markers`: the answer was written from the rejected branch's private view
    (from c on), so repeating the note (any of these phrases) would put it in the visible transcript."""
    if not private_note_markers:
        return basic_validator

    def check(text: str, finish: str):
        reason, cleaned = basic_validator(text, finish)
        if not reason and shows_private_note(cleaned, private_note_markers):
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


def rewrite_validator(original: str, example: str | None) -> Validator:
    """`example`: the rewrite template's own example, which a lazy model copies back."""
    def check(text: str, finish: str):
        reason, cleaned = basic_validator(text, finish)
        if reason:
            return reason, cleaned
        cleaned = _unquote(_REWRITE_LABEL.sub("", cleaned, count=1))
        if not cleaned:
            return "empty", cleaned
        if _normalize(cleaned) == _normalize(original) or word_jaccard(cleaned, original) >= 0.95:
            return "rewrite_unchanged", cleaned
        if example and _normalize(example) in _normalize(cleaned) and _normalize(example) not in _normalize(original):
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
