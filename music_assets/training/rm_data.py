"""Turns preference pairs into token ids for a reward model, keeping the part that differs.

Conversations are rendered with the backbone's chat template (HF `apply_chat_template`). Encoder
backbones such as MiniLM have none; for them the config must name `chat_template: plain` (a
"User: / Assistant:" rendering), so multi-turn data is never flattened by accident.

Truncation: chosen and rejected share a prefix (the context), and the preference is about what
comes after it. A sequence longer than `max_length` loses tokens from the *start* of the shared
context first (left truncation), which keeps the whole difference whenever the differing part
fits; only when it does not is the end cut too. Both cases are counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
)


class DataError(ValueError):
    """Training data or backbone cannot be used; the message says which and why."""


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    pair_id: str = ""

    @property
    def length(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class TruncationStats:
    pairs: int = 0
    context_truncated: int = 0  # lost only shared context: the whole difference kept
    difference_truncated: int = 0  # the differing part itself did not fit: its end was cut
    max_tokens_seen: int = 0

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "context_truncated": self.context_truncated,
                "difference_truncated": self.difference_truncated, "max_tokens_seen": self.max_tokens_seen,
                "how": "left-truncate the shared context first; cut the end only if the differing part alone is too long"}


@dataclass
class PairEncoder:
    tokenizer: object
    max_length: int
    chat_template: str | None = None  # None: the tokenizer's own; "plain": PLAIN_TEMPLATE; else a Jinja template
    stats: TruncationStats = field(default_factory=TruncationStats)

    def __post_init__(self):
        tok = self.tokenizer
        if self.chat_template == "plain":
            self.chat_template = PLAIN_TEMPLATE
        if self.chat_template is None and not getattr(tok, "chat_template", None):
            raise DataError(
                f"the backbone's tokenizer ({type(tok).__name__}) has no chat template, so multi-turn "
                "conversations cannot be rendered faithfully; set `chat_template: plain` (or a Jinja "
                "template) in the training config to choose a rendering explicitly"
            )
        # special tokens the model expects around a sequence (e.g. BERT's [CLS] ... [SEP])
        probe = tok("x", add_special_tokens=True)["input_ids"]
        bare = tok("x", add_special_tokens=False)["input_ids"]
        self._head = probe[: probe.index(bare[0])] if bare and bare[0] in probe else []
        self._tail = probe[len(self._head) + len(bare):] if bare else []
        self._uses_template_specials = self.chat_template is None  # the chat template adds its own
        if self.max_length <= len(self._head) + len(self._tail) + 8:
            raise DataError(f"max_length {self.max_length} is too small")

    def render_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_one(self, messages: list[dict]) -> list[int]:
        """One conversation to score on its own (a Best-of-N candidate): the end is what is being
        compared, so a conversation longer than max_length loses tokens from its start."""
        if not messages or any(not isinstance(m.get("content"), str) for m in messages):
            raise DataError("a conversation to score must be a non-empty list of messages with string content")
        ids = self.render_ids(messages)
        head, tail = ([], []) if self._uses_template_specials else (self._head, self._tail)
        budget = self.max_length - len(head) - len(tail)
        return head + ids[max(0, len(ids) - budget):] + tail

    def encode(self, chosen: list[dict], rejected: list[dict], pair_id: str = "") -> EncodedPair:
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or any(not isinstance(m.get("content"), str) for m in msgs):
                raise DataError(f"pair {pair_id!r}: `{side}` must be a non-empty list of messages with string content")
        c, r = self.render_ids(chosen), self.render_ids(rejected)
        common = 0
        for a, b in zip(c, r):
            if a != b:
                break
            common += 1
        head, tail = ([], []) if self._uses_template_specials else (self._head, self._tail)
        budget = self.max_length - len(head) - len(tail)
        longest = max(len(c), len(r))
        self.stats.pairs += 1
        self.stats.max_tokens_seen = max(self.stats.max_tokens_seen, longest + len(head) + len(tail))
        if longest > budget:
            start = longest - budget  # drop this many tokens from the left of both sequences
            if start <= common:  # only shared context goes: the whole difference is kept
                self.stats.context_truncated += 1
                c, r = c[start:], r[start:]
            else:  # the differing part alone is too long: keep a little context before it, cut the end
                self.stats.difference_truncated += 1
                start = max(0, common - budget // 4)
                c, r = c[start : start + budget], r[start : start + budget]
        return EncodedPair(head + c + tail, head + r + tail, pair_id)
