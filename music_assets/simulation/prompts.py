"""Versioned prompt templates for the MUSIC simulation.

The templates are files in `music_assets/simulation/prompts/` so they can be read, reviewed and edited
without touching code. `PROMPT_VERSION` hashes their content (with the simulation algorithm's
version), and the simulation asset's `code_version` includes it: editing a prompt makes exactly
that asset and its descendants stale, and keys new generations apart from old ones.

`MUSIC_PROMPTS_DIR` names a folder of edited templates (same file names, e.g.
`contrastive_assistant.txt`) that replaces the packaged ones file by file, without touching the
installed package; a template missing there is the packaged one. It is read when this module is
imported (in `dagster dev`: when the code location loads or is reloaded). The version hashes the
content, so a folder of unedited copies keeps the packaged `PROMPT_VERSION`.
"""

from __future__ import annotations

import hashlib
import os
from importlib.resources import files
from pathlib import Path

TEMPLATE_NAMES = ("user_simulator", "contrastive_rewrite", "contrastive_assistant")
JUDGE_TEMPLATE_NAMES = ("judge_pairwise",)
# Bump when the simulation's logic changes in a way that changes its outputs.
SIMULATION_ALGORITHM_VERSION = "music-sim-v3"  # v2: role-swapped user simulator, note on turn c; v3: user may not repeat the rewrite
# Bump when Best-of-N selection or judging changes in a way that changes its outputs.
BEST_OF_N_ALGORITHM_VERSION = "bon-v1"


PROMPTS_DIR_ENV = "MUSIC_PROMPTS_DIR"


def _load() -> dict[str, str]:
    """The templates: each from $MUSIC_PROMPTS_DIR if that folder has it, else the packaged one."""
    root = files("music_assets.simulation") / "prompts"
    override = os.environ.get(PROMPTS_DIR_ENV)
    folder = Path(override).expanduser() if override else None
    if folder is not None and not folder.is_dir():  # a typo must not silently mean "the defaults"
        raise FileNotFoundError(f"{PROMPTS_DIR_ENV} points to {folder}, which is not a folder")
    out = {}
    for name in TEMPLATE_NAMES + JUDGE_TEMPLATE_NAMES:
        edited = folder / f"{name}.txt" if folder is not None else None
        source = edited if edited is not None and edited.is_file() else root / f"{name}.txt"
        out[name] = source.read_text(encoding="utf-8")
    return out


def _version(algorithm: str, names: tuple[str, ...]) -> str:
    return hashlib.sha256("\n\x00".join([algorithm] + [f"{n}\n{TEMPLATES[n]}" for n in names]).encode()).hexdigest()[:16]


TEMPLATES = _load()
PROMPT_VERSION = _version(SIMULATION_ALGORITHM_VERSION, TEMPLATE_NAMES)
# Best-of-N continues conversations with the user simulator and judges them: both prompts count.
JUDGE_PROMPT_VERSION = _version(BEST_OF_N_ALGORITHM_VERSION, ("user_simulator",) + JUDGE_TEMPLATE_NAMES)


def _rewrite_example() -> str | None:
    """The rewritten request the rewrite template shows as its example (`-> "..."`), if any: a
    model that copies it back has not rewritten anything."""
    import re

    found = re.search(r'->\s*"([^"]+)"', TEMPLATES["contrastive_rewrite"])
    return found.group(1) if found else None


REWRITE_EXAMPLE = _rewrite_example()


def render(name: str, **values: str) -> str:
    """Fills a template; only the named `{placeholders}` are substituted (other braces stay)."""
    text = TEMPLATES[name]
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text.strip()


# Some chat templates insist that a conversation opens with a user turn.
OPENING_CUE = "(The chat starts. Write the user's first message.)"


def user_simulator_messages(messages: list[dict]) -> list[dict]:
    """The user simulator's prompt: the instructions as a system message, then the conversation
    with roles swapped (the real user's messages become the simulator's own, the assistant's
    answers become what it is told), so the model writes the next user message as its reply.

    Why not the transcript pasted into one message: the swapped conversation only ever grows at
    its end, so each turn's prompt extends the previous turn's and vLLM's prefix cache skips
    recomputing it; on a CPU, where prompt processing dominates, that is most of the work.
    """
    swap = {"user": "assistant", "assistant": "user"}
    flipped = [{"role": swap[m["role"]], "content": m["content"]} for m in messages if m["role"] in swap]
    if flipped and flipped[0]["role"] == "assistant":
        flipped.insert(0, {"role": "user", "content": OPENING_CUE})
    return [{"role": "system", "content": render("user_simulator")}] + flipped
