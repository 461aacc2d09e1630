"""Versioned prompt templates for the MUSIC simulation.

The templates are files in `music_assets/prompts/` so they can be read, reviewed and edited
without touching code. `PROMPT_VERSION` hashes their content (with the simulation algorithm's
version), and the simulation asset's `code_version` includes it: editing a prompt makes exactly
that asset and its descendants stale, and keys new generations apart from old ones.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

TEMPLATE_NAMES = ("user_simulator", "contrastive_rewrite", "contrastive_assistant")
# Bump when the simulation's logic changes in a way that changes its outputs.
SIMULATION_ALGORITHM_VERSION = "music-sim-v1"


def _load() -> dict[str, str]:
    root = files("music_assets") / "prompts"
    return {name: (root / f"{name}.txt").read_text(encoding="utf-8") for name in TEMPLATE_NAMES}


TEMPLATES = _load()
PROMPT_VERSION = hashlib.sha256(
    "\n\x00".join([SIMULATION_ALGORITHM_VERSION] + [f"{n}\n{TEMPLATES[n]}" for n in TEMPLATE_NAMES]).encode()
).hexdigest()[:16]


def render(name: str, **values: str) -> str:
    """Fills a template; only the named `{placeholders}` are substituted (other braces stay)."""
    text = TEMPLATES[name]
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text.strip()


def transcript(messages: list[dict]) -> str:
    """A conversation as plain text for the user simulator ("User: ... / Assistant: ...")."""
    labels = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{labels.get(m['role'], m['role'])}: {m['content']}" for m in messages)
