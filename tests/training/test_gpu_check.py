"""scripts/gpu_check.py, the GPU device check, in its CPU dry run: the tiny random Llama trained with DDP and
FSDP over gloo, every check of the GPU run, and an import guard that makes the pipeline's packages (absent on
the GPU machine) unimportable, so that the check is known to need only torch, transformers and tokenizers."""

import runpy
import subprocess
import sys

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"
NOT_ON_THE_GPU_MACHINE = "dagster,duckdb,polars,vllm,pydantic"


@pytest.mark.slow
def test_cpu_dry_run_passes_without_the_pipeline_packages():
    """11-40 s on 2 cores (bf16 on a CPU, and the load): both strategies train 4 steps, and packed pairs give
    unpacked training's loss and gradients and whole-sequence rewards (the blocks kernel here, FlexAttention on
    the GPU); exit 0: every check passed."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--steps", "4", "--forbid-imports",
                           NOT_ON_THE_GPU_MACHINE], cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith(("ddp ", "fsdp ", "prefix "))}
    assert set(rows) == {"ddp", "fsdp", "prefix"} and all(row[-1] == "ok" for row in rows.values()), out
    assert rows["ddp"][1] == rows["fsdp"][1] == "4", out
    assert "[prefix] tiny Llama, blocks kernel" in out and "largest gradient difference" in out, out
    guard = next(line for line in proc.stdout.splitlines() if line.startswith("import guard"))
    imports = [entry for entry in guard.split(": ", 1)[1].split("; ") if "probed (allowed)" not in entry]
    assert imports in ([], ["none attempted"]), guard  # nothing even tried to import them (and failed quietly)


def test_import_guard_names_the_chain_that_imports_a_blocked_module():
    """The guard itself, on a stdlib module nothing here has imported yet: the import fails as if the module
    were not installed, and the message says which code asked for it."""
    if "wave" in sys.modules:
        pytest.skip("wave is already imported: the guard cannot stop an import that has happened")
    guard = runpy.run_path(str(SCRIPT), run_name="gpu_check")["ImportGuard"](["wave"])
    sys.meta_path.insert(0, guard)
    try:
        with pytest.raises(ModuleNotFoundError, match=r"'wave' \(blocked .*test_gpu_check\.test_import_guard"):
            import wave  # noqa: F401
    finally:
        sys.meta_path.remove(guard)
    assert len(guard.attempts) == 1 and guard.attempts[0].startswith("wave <- ")
