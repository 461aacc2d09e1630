"""What the simulation, Best-of-N and the judge need from an LLM engine, with no Dagster in it:
the request and answer types, the `ChatEngine` protocol, and request streams.

`chat(conversations, sampling, seeds)` takes a whole batch of conversations and returns one
`Generation` per conversation (with `sampling.n` candidates each). `sampling` is one `Sampling`
for the whole batch or one per conversation (Best-of-N sends N = 2, 4 and 8 in one call).
`stream()` is for callers whose requests depend on earlier answers (the simulation): requests are
submitted one by one and come back as each finishes.

Two conventions every backend keeps: a conversation that *ends with an assistant message* asks the
engine to continue that message (no new turn: `continue_final_message`), which is how a cut answer
is completed (`on_length: continue`); and system messages are sent as such unless the model's chat
template refuses the system role (Gemma-2 raises on it), in which case the backend folds them into
the first user turn (`fold_system_messages`), so a role's instructions are never lost.

The engines themselves are Dagster resources (`resources/llm.py`: the base class;
`resources/vllm_engine.py`: vLLM in process; `resources/openai_engine.py`: any OpenAI-compatible
server); they implement this protocol, and the logic here never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from music_assets.common.config import setting


Message = dict[str, str]


@dataclass(frozen=True)
class Sampling:
    """How one request is sampled; also the type of every `*_sampling` config setting."""

    temperature: float = setting(0.7, help="softmax temperature (0: greedy)")
    top_p: float = setting(0.95, help="nucleus sampling: the smallest token set with this probability mass")
    max_tokens: int = setting(256, help="longest answer in tokens; a longer one is cut and retried")
    n: int = setting(1, help="candidates per request (Best-of-N sets it per N)")

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.n < 1:
            raise ValueError(f"n must be >= 1 (got {self.n})")

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "n": self.n}


@dataclass
class Generation:
    """The candidates for one conversation. `finish_reasons[i]` is 'stop' or 'length' (cut)."""

    texts: list[str]
    finish_reasons: list[str]  # "error" when the engine refused this one request
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None  # why it was refused (e.g. the prompt exceeds the context length)

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def truncated(self) -> bool:
        return self.finish_reasons[0] == "length"


class EngineError(RuntimeError):
    """The engine could not produce a generation (after retries, where retrying makes sense)."""


class ChatEngine(Protocol):
    """An engine as the logic sees it (`resources.llm.LLMEngine` and its backends implement it)."""

    model: str

    def chat(
        self, conversations: list[list[Message]], sampling: Sampling | list[Sampling], seeds: list[int] | None = None
    ) -> list[Generation]: ...

    def identity(self) -> dict: ...

    def stream(self) -> RequestStream: ...


class RequestStream:
    """Takes requests at any time and hands each generation back when it is finished.

    `submit` queues one request under a caller-chosen key; `wait` blocks until at least one
    queued request is finished and returns `(key, Generation)` for all that are. A caller that
    submits a request as soon as the answer it depends on arrives keeps the engine's batch full,
    instead of waiting for the slowest request of a step (or for a retry of one request) while
    the engine runs almost empty.

    `session` names the conversation a request belongs to (the simulation passes its context id):
    every request of a session extends the same prefix, so a backend in front of several replicas
    can send them all to the one that has that prefix cached (the OpenAI backend puts it in a
    header a router hashes on). A backend with one engine has nothing to route and ignores it. It
    is an argument, not something read from `key`, because keys stay the caller's own business."""

    def submit(self, key, conversation: list[Message], sampling: Sampling, seed: int | None = None,
               session: str | None = None) -> None:
        raise NotImplementedError

    def wait(self) -> list[tuple[object, Generation]]:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Gives up on what is still in flight (the caller failed midway)."""


class BatchedStream(RequestStream):
    """For any `chat` engine: everything submitted since the last `wait` goes out as one batched call."""

    def __init__(self, engine: ChatEngine):
        self.engine, self.queue = engine, []

    def submit(self, key, conversation, sampling, seed=None, session=None):
        self.queue.append((key, conversation, sampling, seed))

    def wait(self):
        batch, self.queue = self.queue, []
        if not batch:
            return []
        keys, conversations, samplings, seeds = zip(*batch)
        return list(zip(keys, self.engine.chat(list(conversations), list(samplings), list(seeds))))

    @property
    def pending(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        self.queue = []


def continues_final_message(conversation: list[Message]) -> bool:
    """Whether this request continues its last message (see the module docstring)."""
    return bool(conversation) and conversation[-1]["role"] == "assistant"


def fold_system_messages(conversation: list[Message]) -> list[Message]:
    """The conversation for a template without a system role: the system messages' text opens the
    first user message (or becomes one, when the conversation has no user turn before the first
    answer). Kept as text, not dropped: the user simulator's whole instruction is its system message."""
    system = [m["content"] for m in conversation if m["role"] == "system"]
    if not system:
        return conversation
    rest = [m for m in conversation if m["role"] != "system"]
    head = "\n\n".join(system)
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{head}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": head}] + rest


def per_request(sampling: Sampling | list[Sampling], count: int) -> list[Sampling]:
    if isinstance(sampling, Sampling):
        return [sampling] * count
    if len(sampling) != count:
        raise ValueError(f"{len(sampling)} sampling settings for {count} conversations")
    return list(sampling)
