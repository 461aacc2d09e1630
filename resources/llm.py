"""LLM engines as Dagster resources: one interface (`music_assets.common.engines`), two backends.

This module holds what the backends share: `LLMEngine`, the resource base class they subclass.
Each backend has a module of its own, and `resources/engine_factory.py` builds the one that a
config spec names:
- `VLLMEngine` (`resources/vllm_engine.py`): in-process `vllm.LLM` on CPU or GPU.
- `OpenAIEngine` (`resources/openai_engine.py`): any OpenAI-compatible server.

`chat(conversations, sampling, seeds)` takes a whole batch of conversations and returns one
`Generation` per conversation (with `sampling.n` candidates each). `sampling` is one `Sampling`
for the whole batch or one per conversation (Best-of-N sends N = 2, 4 and 8 in one call).
Callers always hand over the full batch of a step, and each backend schedules it as suits it best.

`stream()` is for callers whose requests depend on earlier answers (the simulation): requests are
submitted one by one and come back as each finishes. The vLLM and OpenAI backends hand back each
request as it finishes; any other backend batches whatever was submitted into one `chat` call
per `wait` (the default here).

Per-request seeds make sampling reproducible independently of how requests are batched.
"""

from __future__ import annotations

from dagster import ConfigurableResource

from music_assets.common.engines import BatchedStream, Generation, Message, RequestStream, Sampling


class LLMEngine(ConfigurableResource):
    """Base class; subclasses implement `chat`. `model` is a local folder, an HF id or a served name."""

    model: str

    def chat(
        self, conversations: list[list[Message]], sampling: Sampling | list[Sampling], seeds: list[int] | None = None
    ) -> list[Generation]:
        raise NotImplementedError

    def identity(self) -> dict:
        """What determines this engine's outputs (goes into generation keys and metadata).
        Never includes credentials."""
        return {"backend": type(self).__name__, "model": self.model}

    def stream(self) -> RequestStream:
        """A stream of requests for callers whose next request depends on an earlier answer (the
        simulation). This default batches whatever was submitted into one `chat` call per
        `wait`; the vLLM and OpenAI backends override it to hand back each request as it finishes."""
        return BatchedStream(self)
