"""Versioned prompt templates for the MUSIC simulation, Best-of-N's user simulator and the judge.

The templates are files in `music_assets/simulation/prompts/` so they can be read, reviewed and
edited without touching code. A `Prompts` object holds one set of them; its `version` hashes their
content (with the simulation algorithm's version) and is part of `simulated_branches`' code version
and of every generation key: editing a prompt makes exactly that asset and its descendants stale,
and keys new generations apart from old ones. `judge_version` does the same for Best-of-N.

The config key `prompts_dir` names a folder of edited templates (same file names, e.g.
`contrastive_assistant.txt`) that replaces the packaged ones file by file, without touching the
installed package; a template missing there is the packaged one. The versions hash the content,
so a folder of unedited copies keeps the packaged versions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from importlib.resources import files
from pathlib import Path

TEMPLATE_NAMES = ("user_simulator", "contrastive_rewrite", "contrastive_assistant")
JUDGE_TEMPLATE_NAMES = ("judge_pairwise",)
# Bump when the simulation's logic changes in a way that changes its outputs.
# v2: role-swapped user simulator, note on turn c; v3: user may not repeat the rewrite; v4: the rewriter
# reads the conversation so far, cut messages follow on_length
SIMULATION_ALGORITHM_VERSION = "music-sim-v4"
# Bump when Best-of-N selection or judging changes in a way that changes its outputs.
BEST_OF_N_ALGORITHM_VERSION = "bon-v2"  # v2: judge errors are not ties; the judge context fits its prompts


@dataclass(frozen=True, eq=False)
class Prompts:
    templates: dict[str, str]  # name -> template text
    folder: str | None = None  # the override folder they were read from, if any

    def _version(self, algorithm: str, names: tuple[str, ...]) -> str:
        parts = [algorithm] + [f"{n}\n{self.templates[n]}" for n in names]
        return hashlib.sha256("\n\x00".join(parts).encode()).hexdigest()[:16]

    @cached_property
    def version(self) -> str:
        """The simulation's prompt version."""
        return self._version(SIMULATION_ALGORITHM_VERSION, TEMPLATE_NAMES)

    @cached_property
    def judge_version(self) -> str:
        """Best-of-N continues conversations with the user simulator and judges them: both prompts count."""
        return self._version(BEST_OF_N_ALGORITHM_VERSION, ("user_simulator",) + JUDGE_TEMPLATE_NAMES)

    @cached_property
    def rewrite_example(self) -> str | None:
        """The rewritten request the rewrite template shows as its example (`-> "..."`), if any: a
        model that copies it back has not rewritten anything."""
        found = re.search(r'->\s*"([^"]+)"', self.templates["contrastive_rewrite"])
        return found.group(1) if found else None

    @cached_property
    def private_note_markers(self) -> tuple[str, ...]:
        """Phrases of this set's contrastive-assistant note: one of them in a visible message means
        the note leaked (see `validators.note_markers`)."""
        from music_assets.simulation.validators import note_markers

        return note_markers(self.templates["contrastive_assistant"])

    def render(self, name: str, **values: str) -> str:
        """Fills a template; only the named `{placeholders}` are substituted (other braces stay)."""
        text = self.templates[name]
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        return text.strip()

    def rewrite_messages(self, history: list[dict], instruction: str, max_chars: int) -> list[dict]:
        """The rewriter's prompt: the conversation before the turn-c request, as the chat it is,
        then the rewrite instruction with the request; so a follow-up ("make it shorter") is
        rewritten knowing what "it" is. The conversation is bounded to its latest messages within
        `max_chars` (an engine context is finite and the oldest turns matter least); a latest
        message longer than that keeps its end.

        Why a chat and not a transcript pasted into the instruction: SmolLM2-135M copied the
        pasted "User: ..." lines into its rewrite (measured on the demo), and the chat form is the
        branches' own prefix, which vLLM's prefix cache already holds."""
        shown: list[dict] = []
        budget = max_chars
        for m in reversed(history):
            text = m["content"].strip()
            if len(text) > budget:
                if not shown and budget > 0:
                    shown.append({"role": m["role"], "content": "…" + text[-budget:]})
                break
            shown.append({"role": m["role"], "content": text})
            budget -= len(text)
        shown.reverse()
        while shown and shown[0]["role"] != "user":  # chat templates expect a user turn first
            shown.pop(0)
        return shown + [{"role": "user", "content": self.render("contrastive_rewrite", instruction=instruction)}]

    def user_simulator_messages(self, messages: list[dict]) -> list[dict]:
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
        return [{"role": "system", "content": self.render("user_simulator")}] + flipped


def load_prompts(folder: str | None = None) -> Prompts:
    """The templates: each from `folder` if that folder has it, else the packaged one."""
    root = files("music_assets.simulation") / "prompts"
    override = Path(folder).expanduser() if folder else None
    if override is not None and not override.is_dir():  # a typo must not silently mean "the defaults"
        raise FileNotFoundError(f"prompts_dir points to {override}, which is not a folder")
    templates = {}
    for name in TEMPLATE_NAMES + JUDGE_TEMPLATE_NAMES:
        edited = override / f"{name}.txt" if override is not None else None
        source = edited if edited is not None and edited.is_file() else root / f"{name}.txt"
        templates[name] = source.read_text(encoding="utf-8")
    return Prompts(templates, str(override) if override else None)


PACKAGED = load_prompts()  # the templates shipped with the package (the decorated assets' versions)


# Some chat templates insist that a conversation opens with a user turn.
OPENING_CUE = "(The chat starts. Write the user's first message.)"
