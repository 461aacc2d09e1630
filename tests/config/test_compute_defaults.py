"""The compute defaults come from the machine, so that a first run gets the speed the benchmark
reports (issue: on 2 cores vLLM's own `auto` binding computed on one core, a/b 4.15 instead of
~6; a 1 GiB KV cache held too few live branches)."""

import os

import pytest

from resources.compute import SMALL_MACHINE_CORES, ComputeResource, core_list


def test_threads_bind_every_usable_core_on_a_small_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert ComputeResource().vllm_environment()["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 5})  # a container's share of a host
    assert ComputeResource().resolved_threads_bind() == "2-3,5"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(SMALL_MACHINE_CORES + 12)))
    assert ComputeResource().resolved_threads_bind() == "auto"  # vLLM's own NUMA-aware binding
    assert ComputeResource(cpu_threads_bind="vllm-auto").resolved_threads_bind() == "auto"
    assert ComputeResource(cpu_threads_bind="nobind").resolved_threads_bind() == "nobind"
    assert ComputeResource(cpu_threads_bind="0").resolved_threads_bind() == "0"


def test_kv_cache_from_the_setting_the_variable_or_the_memory(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr("resources.compute.memory_gib", lambda: 24)
    assert ComputeResource().resolved_kv_cache_gib() == 4
    monkeypatch.setattr("resources.compute.memory_gib", lambda: 3)
    assert ComputeResource().resolved_kv_cache_gib() == 1
    monkeypatch.setattr("resources.compute.memory_gib", lambda: 512)
    assert ComputeResource().resolved_kv_cache_gib() == 16
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # the test command keeps engines small this way
    assert ComputeResource().vllm_environment()["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert ComputeResource(cpu_kv_cache_gib=6).vllm_environment()["VLLM_CPU_KVCACHE_SPACE"] == "6"


def test_gpu_runs_set_no_cpu_variables():
    assert ComputeResource(device="cuda").vllm_environment() == {}


@pytest.mark.parametrize("cores, text", [([0], "0"), ([0, 1, 2, 3], "0-3"), ([0, 2, 4], "0,2,4"), ([1, 2, 7, 8, 9], "1-2,7-9")])
def test_core_list(cores, text):
    assert core_list(cores) == text
