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
SIMULATION_ALGORITHM_VERSION = "music-sim-v3"  # v3: user-simulator prompt shares the assistant's prefix


def _load() -> dict[str, str]:
    root = files("music_assets") / "prompts"
    return {name: (root / f"{name}.txt").read_text(encoding="utf-8") for name in TEMPLATE_NAMES}


TEMPLATES = _load()
PROMPT_VERSION = hashlib.sha256(
    "\n\x00".join([SIMULATION_ALGORITHM_VERSION] + [f"{n}\n{TEMPLATES[n]}" for n in TEMPLATE_NAMES]).encode()
).hexdigest()[:16]


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


def user_simulator_messages(messages: list[dict]) -> list[dict]:
    """The user simulator's prompt: the conversation exactly as the assistant sees it, then one
    more user turn carrying the role-play instruction; the model's reply is the next user message.

    Why this shape: the conversation part is token for token the assistant's own prompt of the
    same branch, so vLLM's prefix cache computes it once for both roles, for both branches up to
    their divergence, and across turns (each turn's prompt extends the previous one). On a CPU,
    where prompt processing dominates, that is most of the work (see the README's benchmark).
    """
    return [dict(m) for m in messages] + [{"role": "user", "content": render("user_simulator")}]
