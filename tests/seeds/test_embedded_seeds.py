"""Structural checks for the embedded seed preference set.

The file ships inside the package (music_assets/data/embedded_seeds.jsonl) and is
read here by path, so the test needs no project imports.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.helpers import REPO

SEEDS_PATH = REPO / "music_assets" / "data" / "embedded_seeds.jsonl"

MIN_ROWS = 64
MIN_DOMAINS = 8
MIN_PER_DOMAIN = 6
MIN_USER_TURNS = 2
MAX_USER_TURNS = 4
MAX_CONTENT_CHARS = 2000
REQUIRED_DOMAINS = {"cooking", "coding", "travel", "math", "health", "writing", "finance", "science"}


def _load_rows() -> list[dict]:
    raw = SEEDS_PATH.read_bytes()
    text = raw.decode("utf-8")  # raises if the file is not valid UTF-8
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        assert line.strip(), f"blank line {lineno} in {SEEDS_PATH.name}"
        row = json.loads(line)
        assert isinstance(row, dict), f"line {lineno} is not a JSON object"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    assert SEEDS_PATH.is_file(), f"missing {SEEDS_PATH}"
    return _load_rows()


def _ids(rows):
    return [row.get("id", f"<row {i}>") for i, row in enumerate(rows)]


def test_row_count(rows):
    assert len(rows) >= MIN_ROWS


def test_fields_present(rows):
    for row in rows:
        assert set(row) >= {"id", "domain", "chosen", "rejected"}, row.get("id")
        assert isinstance(row["id"], str) and row["id"].strip(), row
        assert isinstance(row["domain"], str) and row["domain"].strip(), row["id"]
        assert isinstance(row["chosen"], list) and isinstance(row["rejected"], list), row["id"]


def test_ids_unique(rows):
    counts = Counter(row["id"] for row in rows)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    assert not dupes, f"duplicate ids: {dupes}"


def test_domains(rows):
    counts = Counter(row["domain"] for row in rows)
    assert len(counts) >= MIN_DOMAINS, counts
    assert REQUIRED_DOMAINS <= set(counts), REQUIRED_DOMAINS - set(counts)
    big_enough = [d for d, n in counts.items() if n >= MIN_PER_DOMAIN]
    assert len(big_enough) >= MIN_DOMAINS, counts
    for domain in REQUIRED_DOMAINS:
        assert counts[domain] >= MIN_PER_DOMAIN, (domain, counts[domain])


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_messages_well_formed(rows, side):
    for row in rows:
        messages = row[side]
        for message in messages:
            assert set(message) == {"role", "content"}, (row["id"], side, message)
            assert message["role"] in {"system", "user", "assistant"}, (row["id"], side)
            content = message["content"]
            assert isinstance(content, str), (row["id"], side)
            assert content.strip(), f"{row['id']} {side}: empty content"
            assert len(content) <= MAX_CONTENT_CHARS, f"{row['id']} {side}: {len(content)} chars"
            content.encode("utf-8")  # no lone surrogates


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_roles_alternate(rows, side):
    for row in rows:
        roles = [m["role"] for m in row[side]]
        if roles and roles[0] == "system":
            roles = roles[1:]
        assert "system" not in roles, f"{row['id']} {side}: system message not first"
        assert roles, f"{row['id']} {side}: no turns"
        assert roles[0] == "user", f"{row['id']} {side}: must start with user"
        assert roles[-1] == "assistant", f"{row['id']} {side}: must end with assistant"
        for i, role in enumerate(roles):
            expected = "user" if i % 2 == 0 else "assistant"
            assert role == expected, f"{row['id']} {side}: roles do not alternate: {roles}"
        user_turns = roles.count("user")
        assert MIN_USER_TURNS <= user_turns <= MAX_USER_TURNS, f"{row['id']} {side}: {user_turns} user turns"


def test_user_turn_counts_vary(rows):
    counts = Counter(sum(m["role"] == "user" for m in row["chosen"]) for row in rows)
    assert len(counts) >= 2, counts


def test_chosen_and_rejected_share_prefix(rows):
    for row in rows:
        chosen, rejected = row["chosen"], row["rejected"]
        assert len(chosen) == len(rejected), row["id"]
        assert chosen[:-1] == rejected[:-1], f"{row['id']}: context differs between chosen and rejected"
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant", row["id"]
        assert chosen[-1]["content"].strip() != rejected[-1]["content"].strip(), (
            f"{row['id']}: final answers are identical"
        )
