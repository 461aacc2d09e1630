"""The engine resource that a config spec names: `build_engine` picks the backend.

Kept out of the code location (`music_assets/definitions.py`) so that anything that builds engines
from settings (the code location, a benchmark, a test) does it the same way, and out of
`resources/llm.py` because each backend's module imports the base class from there: a factory in
that module would import them back, an import cycle (see tests/structure/test_layering.py).
"""

from __future__ import annotations

from resources.compute import ComputeResource
from resources.llm import LLMEngine
from resources.openai_engine import OpenAIEngine
from resources.vllm_engine import VLLMEngine


def build_engine(spec: dict, compute: ComputeResource) -> LLMEngine:
    """An engine resource from a config spec: {backend: vllm|openai, model: ..., options...}."""
    spec = dict(spec)
    backend = spec.pop("backend", "vllm")
    if backend == "vllm":
        return VLLMEngine(compute=compute, **spec)
    if backend == "openai":
        return OpenAIEngine(**spec)
    raise ValueError(f"unknown engine backend {backend!r}; expected 'vllm' or 'openai'")
