"""The OpenAI-compatible HTTP backend of `LLMEngine`: any OpenAI-compatible server (a `vllm serve`
fleet, a hosted API), with bounded concurrency, timeouts and retries with exponential backoff on
429, 5xx and connection errors. The API key is read from an environment variable at call time and
is never stored or logged.

A module of its own because it shares nothing with the in-process vLLM backend but the base class:
it is an HTTP client, its retry policy and the parsing of chat completions. `chat` fans a step's
batch out over a bounded pool of HTTP requests; `stream()` posts each submitted request at once
(bounded concurrency) and hands back responses as they arrive; a request submitted with a
session (the simulation's context id) names it in a header, for a router in front of a fleet of
replicas to keep each conversation on the replica that has its prefix cached (docs/scale-out.md).
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Literal

from dagster import get_dagster_logger
from pydantic import Field

from music_assets.common.engines import (
    EngineError,
    Generation,
    RequestStream,
    continues_final_message,
    fold_system_messages,
    per_request,
)
from resources.llm import LLMEngine

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_FOLDS_SYSTEM: set[tuple[str, str]] = set()  # (base_url, model) of servers that refused a system message


@dataclass
class _RetryPolicy:
    max_retries: int
    backoff_s: float
    backoff_max_s: float
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter (attempt 0 -> up to backoff_s)."""
        return self.rng.uniform(0, min(self.backoff_max_s, self.backoff_s * 2**attempt))


class OpenAIEngine(LLMEngine):
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # name of the variable holding the key; unset -> no auth header
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    # Gemma-2's template raises on a system turn; a vLLM server answers that with HTTP 400.
    system_role: Literal["auto", "native", "fold"] = Field(
        "auto", description="system messages: auto (sent as such until the server refuses the system role, then "
                            "folded into the first user turn), native, or fold (always)")

    # A fleet of replicas behind a router (vllm-router --policy consistent_hash hashes this header
    # first): each request names its conversation, so all turns of a context, both branches
    # included, go to the replica that holds their shared prefix in its KV cache.
    session_header: str | None = Field(
        "X-Session-ID", description="header carrying each request's session (the simulation's context id), for a "
                                    "router's session affinity; null: send none")

    def chat(self, conversations, sampling, seeds=None):
        if not conversations:
            return []
        seeds = seeds or [None] * len(conversations)
        stream = self.stream()
        try:
            for i, (messages, params, seed) in enumerate(zip(conversations, per_request(sampling, len(conversations)), seeds)):
                stream.submit(i, messages, params, seed)
            results = {}
            while stream.pending:
                results.update(stream.wait())
        finally:
            stream.close()
        return [results[i] for i in range(len(conversations))]

    def stream(self) -> RequestStream:
        """Each submitted request is posted at once (up to `max_concurrency` in flight), and
        comes back as soon as its response does: the server's own continuous batching then
        sees every request as early as the caller could send it."""
        return _HTTPStream(self)

    def _key(self) -> tuple[str, str]:
        return self.base_url, self.model

    def folds_system(self) -> bool:
        return self.system_role == "fold" or (self.system_role == "auto" and self._key() in _FOLDS_SYSTEM)

    def _post_with_retries(self, client, body: dict, policy: _RetryPolicy, headers: dict | None = None) -> Generation:
        import httpx

        url = self.base_url.rstrip("/") + "/chat/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                response = client.post(url, json=body, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, timed out, dropped mid-response
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return _parse_completion(response.json())
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if (response.status_code == 400 and self.system_role == "auto" and self._key() not in _FOLDS_SYSTEM
                        and "system" in response.text.lower() and any(m["role"] == "system" for m in body["messages"])):
                    # the model's template refuses the system role: fold it, for this and later requests
                    _FOLDS_SYSTEM.add(self._key())
                    get_dagster_logger().warning(f"{url} refused a system message; folding system messages into "
                                                 "the first user turn from now on")
                    return self._post_with_retries(client, {**body, "messages": fold_system_messages(body["messages"])},
                                                   policy, headers)
                if response.status_code not in RETRY_STATUS:
                    # This request is refused (e.g. prompt too long): report it, keep the batch going.
                    return Generation([""], ["error"], error=f"{url} rejected the request ({last})")
            if attempt < self.max_retries:
                wait = policy.delay(attempt)
                get_dagster_logger().warning(
                    f"{url}: attempt {attempt + 1}/{self.max_retries + 1} failed ({last}); retrying in {wait:.1f}s"
                )
                time.sleep(wait)
        raise EngineError(f"{url} failed after {self.max_retries + 1} attempts; last error: {last}")

    def identity(self):
        return {**super().identity(), "base_url": self.base_url}


class _HTTPStream(RequestStream):
    def __init__(self, engine: OpenAIEngine):
        import httpx

        self.engine = engine
        self.policy = _RetryPolicy(engine.max_retries, engine.backoff_s, engine.backoff_max_s)
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(engine.api_key_env) if engine.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=engine.max_concurrency, max_keepalive_connections=engine.max_concurrency)
        self.client = httpx.Client(timeout=engine.timeout_s, limits=limits, headers=headers)
        self.pool = ThreadPoolExecutor(max_workers=engine.max_concurrency)
        self.futures: dict = {}  # Future -> caller's key

    def submit(self, key, conversation, sampling, seed=None, session=None):
        if self.engine.folds_system():
            conversation = fold_system_messages(conversation)
        body = {"model": self.engine.model, "messages": conversation, **sampling.as_dict()}
        if continues_final_message(conversation):  # vLLM's extension of the chat API (a hosted API may refuse it)
            body.update(continue_final_message=True, add_generation_prompt=False)
        if seed is not None:
            body["seed"] = seed
        headers = {self.engine.session_header: session} if session and self.engine.session_header else None
        self.futures[self.pool.submit(self.engine._post_with_retries, self.client, body, self.policy, headers)] = key

    def wait(self):
        done, _ = futures_wait(self.futures, return_when=FIRST_COMPLETED)
        # a request that failed after its retries raises here (EngineError), as `chat` does
        return [(self.futures.pop(f), f.result()) for f in done]

    @property
    def pending(self) -> int:
        return len(self.futures)

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
        self.futures = {}


def _parse_completion(payload: dict) -> Generation:
    try:
        choices = sorted(payload["choices"], key=lambda c: c.get("index", 0))
        texts = [c["message"]["content"] or "" for c in choices]
        reasons = [c.get("finish_reason") or "stop" for c in choices]
    except (KeyError, TypeError) as exc:
        raise EngineError(f"malformed chat completion response: {str(payload)[:300]}") from exc
    usage = payload.get("usage") or {}
    return Generation(texts, reasons, usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0))
