"""Turns preference pairs into token ids for a reward model, keeping the part that differs.

Conversations are rendered with the backbone's chat template (HF `apply_chat_template`). Encoder
backbones such as MiniLM have none; for them the config must name `chat_template: plain` (a
"User: / Assistant:" rendering), so multi-turn data is never flattened by accident.

Truncation (a rendering longer than `max_length`). The reward is read at the last token, so the
end of the rendering -- the template's end-of-turn tokens included -- is never cut. What goes:

* The template's fixed *head* is always kept: BOS and whatever the template emits before the
  first message it renders (a default system prompt, a Llama-3 system header), and leading
  `system` messages with it, because they govern every turn. Cutting them would show the model a
  sequence it never sees at inference (e.g. no BOS) and change what is being judged. (A head over
  half of max_length -- a huge system prompt -- is the exception: only BOS is kept whole.)
* After the head, whole oldest messages of the shared context go first. When even the last shared
  message (the prompt the responses answer) does not fit whole, it is kept partly: its role header
  and the end of its content (a question's end is more telling than its start, and the sequence
  stays well formed).
* The differing part (from the first message that differs to the end) is never cut while it fits
  after the head. When it alone does not fit, the pair is *kept with its last tokens*: each side is
  the head plus its own final tokens, so the reward is still read at the true end. Such pairs are
  counted in `TruncationStats.difference_truncated` (callers report `encoder.stats`). Skipping them
  instead was rejected: on HH-RLHF at 64 tokens it would drop 35% of the pairs, and skips bias an
  evaluation set toward short answers and differ between checkpoints with different max lengths,
  so their accuracies would not be over the same items.

Message boundaries come from rendering growing prefixes of the conversation (messages[:k]) and
checking that each is a text- and token-exact prefix of the full rendering (true for ChatML,
Llama-3 and Gemma-style templates and PLAIN_TEMPLATE). A template for which they are not (one that
renders a message differently depending on what follows, or closes every rendering with a fixed
tail) falls back to a token-level cut right after the head, counted in `token_level`. A
conversation that fits is encoded exactly as the template and tokenizer render it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from music_assets.common.sequences import common_prefix_length

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
)
# stands in for a message's content when locating the text a template emits before it
_MARKER = "\u2063music-content-marker\u2063"


class DataError(ValueError):
    """Training data or backbone cannot be used; the message says which and why."""


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    pair_id: str = ""
    # the seed conversation the pair comes from (curation's group_id: a seed pair and the MUSIC pairs simulated
    # from it); "" when unknown. `group_by_conversation` batches a group's pairs together.
    group: str = ""
    # leading tokens chosen and rejected have in common (after truncation): what prefix sharing can reuse
    shared: int = field(init=False)

    def __post_init__(self):
        self.shared = common_prefix_length([self.chosen, self.rejected])

    @property
    def length(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass
class TruncationStats:
    pairs: int = 0
    context_truncated: int = 0  # lost only shared context (oldest messages): the whole difference kept
    difference_truncated: int = 0  # the differing part alone did not fit: each side kept the head and its last tokens
    conversations: int = 0  # encode_one: conversations scored alone
    conversations_truncated: int = 0
    token_level: int = 0  # truncated sequences whose template gave no token-exact message boundaries
    max_tokens_seen: int = 0

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "context_truncated": self.context_truncated,
                "difference_truncated": self.difference_truncated, "conversations": self.conversations,
                "conversations_truncated": self.conversations_truncated, "token_level": self.token_level,
                "max_tokens_seen": self.max_tokens_seen,
                "how": "keep the template head (BOS, system prompt) and the end; drop whole oldest messages, then the "
                       "start of the last shared message's content; a difference too long alone keeps its last tokens"}


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

    def render_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False)

    def render_ids(self, messages: list[dict]) -> list[int]:
        return self._ids(self.render_text(messages))

    def encode_one(self, messages: list[dict]) -> list[int]:
        """One conversation to score on its own (a Best-of-N candidate). The last message is the
        part being compared, so it is treated as a pair's difference: a conversation longer than
        max_length keeps the head, drops its oldest messages, and only then cuts the start of the
        last message itself."""
        if not messages or any(not isinstance(m.get("content"), str) for m in messages):
            raise DataError("a conversation to score must be a non-empty list of messages with string content")
        text = self.render_text(messages)
        ids = self._ids(text)
        head, tail = self._specials()
        self.stats.conversations += 1
        self.stats.max_tokens_seen = max(self.stats.max_tokens_seen, len(ids) + len(head) + len(tail))
        budget = self.max_length - len(head) - len(tail)
        if len(ids) > budget:
            self.stats.conversations_truncated += 1
            ids = self._truncate(messages, text, [ids], len(messages) - 1, budget)[0]
        return head + ids + tail

    def encode(self, chosen: list[dict], rejected: list[dict], pair_id: str = "", group: str = "") -> EncodedPair:
        """Both sides, cut alike (see the module docstring) so they keep a common prefix; every pair
        is encoded, the ones whose difference alone was too long are counted in `stats`."""
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or any(not isinstance(m.get("content"), str) for m in msgs):
                raise DataError(f"pair {pair_id!r}: `{side}` must be a non-empty list of messages with string content")
        text = self.render_text(chosen)
        c, r = self._ids(text), self.render_ids(rejected)
        head, tail = self._specials()
        budget = self.max_length - len(head) - len(tail)
        self.stats.pairs += 1
        self.stats.max_tokens_seen = max(self.stats.max_tokens_seen, max(len(c), len(r)) + len(head) + len(tail))
        if max(len(c), len(r)) > budget:
            differ = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
            c, r = self._truncate(chosen, text, [c, r], differ, budget)
        return EncodedPair(head + c + tail, head + r + tail, pair_id, group)

    # --- truncation -------------------------------------------------------------------------------------

    def _specials(self) -> tuple[list[int], list[int]]:
        return ([], []) if self._uses_template_specials else (self._head, self._tail)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _truncate(self, messages: list[dict], text: str, sides: list[list[int]], differ: int, budget: int) -> list[list[int]]:
        """`sides` (renderings of conversations that share `messages[:differ]`, `text` the first's)
        cut to `budget` tokens each: the head, then the end. Counts what it did in `self.stats`."""
        shared_ids = sides[0][: common_prefix_length(sides)] if len(sides) > 1 else sides[0]
        head, system = self._head_length(messages, text, shared_ids), _leading_system(messages)
        starts = self._message_starts(messages, text, shared_ids, range(system + 1, min(differ, len(messages)) + 1))
        if head > budget // 2:  # a huge system prompt: only BOS is sacred, the rest is cut like context
            head, starts = self._bos_length(shared_ids), None
        room = budget - head
        cut = max(len(s) for s in sides) - room  # keep sides[i][cut:] after the head
        # where the differing part begins: the differing message (the head, if that is a system message)
        difference = len(shared_ids) if starts is None else starts[-1] if starts else head
        if cut > difference:  # the difference alone does not fit: each side keeps its last tokens
            if len(sides) > 1:
                self.stats.difference_truncated += 1
            return [s[:head] + s[max(head, len(s) - room):] for s in sides]
        if len(sides) > 1:
            self.stats.context_truncated += 1
        if starts is None:  # no token-exact message boundaries: cut at the token level after the head
            self.stats.token_level += 1
            return [s[:head] + s[cut:] for s in sides]
        whole = next((b for b in starts[:-1] if b >= cut), None)  # drop whole oldest messages
        if whole is not None:
            return [s[:head] + s[whole:] for s in sides]
        # the last shared message must be kept partly: its header, then its content's end
        last = differ - 1
        begin = starts[-2] if len(starts) > 1 else head
        header = self._content_start(messages, last, text, shared_ids)
        if header is None or header < begin:
            header = begin  # no token-exact header found: cut the message at the token level
        content_from = cut + (header - begin)
        if content_from >= difference:  # nothing of its content would remain: drop it whole
            return [s[:head] + s[difference:] for s in sides]
        return [s[:head] + s[begin:header] + s[content_from:] for s in sides]

    def _prefix_length(self, prefix: str, text: str, ids: list[int]) -> int | None:
        """Tokens of `prefix` if it is a text- and token-exact prefix of the rendering `text`/`ids`."""
        if not text.startswith(prefix):
            return None
        prefix_ids = self._ids(prefix)
        return len(prefix_ids) if ids[: len(prefix_ids)] == prefix_ids else None

    def _head_length(self, messages: list[dict], text: str, ids: list[int]) -> int:
        """Tokens before the first message that may be dropped: BOS, a default system prompt or
        system header, and leading system messages. Without system messages, the head is what
        rendering the first message alone adds to how the same message renders later on (a probe
        conversation first, other, first); else what an empty conversation renders; else BOS."""
        system = _leading_system(messages)
        candidates = [lambda: self.render_text(messages[:system])] if system else [
            lambda: self._head_by_probe(messages[0]), lambda: self.render_text([])]
        for candidate in candidates:
            try:
                prefix = candidate()
            except Exception:  # noqa: BLE001 - a template may refuse a probe (e.g. roles must alternate)
                continue
            length = None if prefix is None else self._prefix_length(prefix, text, ids)
            if length is not None:
                return max(length, self._bos_length(ids))
        return self._bos_length(ids)

    def _bos_length(self, ids: list[int]) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return 1 if ids and bos is not None and ids[0] == bos else 0

    def _head_by_probe(self, first: dict) -> str | None:
        other = {"role": "assistant" if first.get("role") == "user" else "user", "content": "x"}
        before, probe, alone = self.render_text([first, other]), self.render_text([first, other, first]), self.render_text([first])
        later = probe[len(before):] if probe.startswith(before) else ""
        return alone[: len(alone) - len(later)] if later and alone.endswith(later) else None

    def _message_starts(self, messages: list[dict], text: str, ids: list[int], indices: range) -> list[int] | None:
        """Token index where each of messages[i] (i in `indices`) begins, or None when some
        prefix rendering is not token-exact (the template is not prefix-consistent)."""
        starts = []
        for i in indices:
            start = self._prefix_length(self.render_text(messages[:i]), text, ids)
            if start is None:
                return None
            starts.append(start)
        return starts

    def _content_start(self, messages: list[dict], index: int, text: str, ids: list[int]) -> int | None:
        """Token index where messages[index]'s content begins (after its role header), if exact."""
        try:
            marked = self.render_text(messages[:index] + [{**messages[index], "content": _MARKER}])
        except Exception:  # noqa: BLE001 - a template may refuse the shortened conversation
            return None
        return self._prefix_length(marked.split(_MARKER)[0], text, ids) if _MARKER in marked else None


def _leading_system(messages: list[dict]) -> int:
    return next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))


