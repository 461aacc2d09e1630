"""The paper's Best-of-N prompt sets: Anthropic HH (the first human turn of each test
conversation) and UltraInteract (prompt-only), read from files in their public schemas
(tests/data/prompt-sets/README.md), one item per prompt, sampled per set with the seed."""

import gzip
import json
from pathlib import Path

import pytest
from dagster import materialize

from music_assets.assembly import build_resources
from music_assets.curation.assets import item_ids
from music_assets.curation.prompt_sets import unique_prompts
from music_assets.evaluation.best_of_n_assets import eval_contexts
from music_assets.seeds.ingest import ingest
from music_assets.seeds.reader import ResolvedSource
from tests.helpers import REAL_DATA, load_settings_in, query

SETS = REAL_DATA / "prompt-sets"
HH = SETS / "hh-prompts.jsonl"
UI_SFT = SETS / "ultrainteract_sft.jsonl"
UI_PAIR = SETS / "ultrainteract_pair.jsonl"
HH_REAL = REAL_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def items(name: str, fmt: str, path: Path) -> tuple[list[dict], list[dict], int]:
    """What eval_items keeps of a set: its rows without repeated prompts (with their item ids), the
    quarantine, and how many repeats were dropped."""
    result = ingest(ResolvedSource.of(name, fmt, str(path)))
    rows, repeated = unique_prompts(result.pairs)
    return [{**r, "item_id": i} for r, i in zip(rows, item_ids(name, rows))], result.quarantine, repeated


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hh_prompts_are_the_first_human_turn_once_each():
    kept, bad, repeated = items("hh", "hh_prompts", HH)
    first_turns = [r["chosen"].split("\n\nHuman: ")[1].split("\n\nAssistant: ")[0] for r in records(HH)]
    assert bad == [] and repeated == 1  # row 4 opens with row 1's question
    assert [r["row_number"] for r in kept] == [1, 2, 3, 5, 6]
    assert [r["chosen"] for r in kept] == [[{"role": "user", "content": first_turns[n - 1]}] for n in (1, 2, 3, 5, 6)]
    assert all(r["kind"] == "prompts" and r["rejected"] == [] and r["extra"] is None for r in kept)
    assert [r["item_id"] for r in kept] == ["hh/1", "hh/2", "hh/3", "hh/5", "hh/6"]  # HH rows have no id


def test_the_real_hh_test_split_gives_one_prompt_per_distinct_opening():
    kept, bad, repeated = items("hh", "hh_prompts", HH_REAL)
    openings = {json.loads(line)["chosen"].split("\n\nAssistant:")[0].removeprefix("\n\nHuman: ").strip()
                for line in gzip.decompress(HH_REAL.read_bytes()).decode().splitlines()}
    assert bad == [] and len(kept) + repeated == 2312 and len(kept) == len(openings) == 2178


@pytest.mark.parametrize("path, parents", [(UI_SFT, 4), (UI_PAIR, 3)])
def test_ultrainteract_gives_one_prompt_per_parent_id(path, parents):
    kept, bad, repeated = items("ui", "ultrainteract", path)
    rows = records(path)
    assert bad == [] and len(kept) == parents and repeated == len(rows) - parents
    by_parent = {r["parent_id"]: r for r in reversed(rows)}  # the first row of each parent
    for item in kept:
        row = by_parent[item["original_id"]]
        prompt = row["instruction"] if "instruction" in row else row["trajectory"][0]["value"]
        assert item["chosen"] == [{"role": "user", "content": prompt}] and item["item_id"] == f"ui/{row['parent_id']}"
        assert json.loads(item["extra"]) == {"task": row["task"], "dataset": row["dataset"]}  # no answers kept


def test_both_ultrainteract_schemas_give_the_same_prompt_for_a_parent():
    sft = {r["original_id"]: r["chosen"] for r in items("ui", "ultrainteract", UI_SFT)[0]}
    pair = {r["original_id"]: r["chosen"] for r in items("ui", "ultrainteract", UI_PAIR)[0]}
    assert pair.items() <= sft.items()  # the two-turn trajectory's feedback turn is not part of the prompt


BAD_ROWS = [  # (format, record, rule, field)
    ("hh_prompts", {"chosen": ["not", "a transcript"], "rejected": ""}, "wrong_type", "chosen"),
    ("hh_prompts", {"chosen": "\n\nAssistant: Hello there.", "rejected": "x"}, "unrecognized_shape", "chosen"),
    ("hh_prompts", {"rejected": "\n\nHuman: hi\n\nAssistant: hello"}, "missing_field", "chosen"),
    ("hh_prompts", {"chosen": "\n\nHuman:   \n\nAssistant: Hi.", "rejected": "x"}, "empty_message", "chosen[0]"),
    ("ultrainteract", {"id": "p_1_1", "parent_id": "p", "task": "Coding", "response": "x"}, "missing_field", "instruction"),
    ("ultrainteract", {"parent_id": "p", "instruction": "  "}, "empty_message", "instruction"),
    ("ultrainteract", {"parent_id": ["p"], "instruction": "Add 2 and 3."}, "wrong_type", "parent_id"),
    ("ultrainteract", {"parent_id": "p", "trajectory": [{"from": "assistant", "value": "hi"}]}, "unrecognized_shape",
     "trajectory[0].from"),
    ("ultrainteract", {"parent_id": "p", "trajectory": [{"from": "user", "value": 7}]}, "wrong_type",
     "trajectory[0].value"),
    ("ultrainteract", {"parent_id": "p", "trajectory": "Add 2 and 3."}, "wrong_type", "trajectory"),
]


@pytest.mark.parametrize("fmt, record, rule, field", BAD_ROWS)
def test_a_bad_row_is_quarantined_with_its_row_and_field(tmp_path, fmt, record, rule, field):
    good = HH if fmt == "hh_prompts" else UI_SFT
    path = tmp_path / "set.jsonl"
    path.write_text(good.read_text() + json.dumps(record) + "\n")
    kept, bad, _ = items("s", fmt, path)
    assert len(kept) == len(items("s", fmt, good)[0])  # the good rows are all still there
    assert [(q["row_number"], q["rule"], q["field"]) for q in bad] == [(len(records(good)) + 1, rule, field)]
    assert field.split("[")[0].split(".")[0] in bad[0]["reason"]  # the sentence names the field too


def hh_rows(path: Path, lines: list[str]) -> list[dict]:
    """The Best-of-N context rows (sql/bon_contexts.sql's shape) of an HH file made of `lines`."""
    path.write_text("\n".join(lines) + "\n")
    kept, _, _ = items("hh", "hh_prompts", path)
    return [{"source": "hh", "context_id": r["item_id"], "messages": r["chosen"]} for r in kept]


def test_the_sample_is_seeded_and_stable_as_the_set_grows(tmp_path):
    lines = gzip.decompress(HH_REAL.read_bytes()).decode().splitlines()
    old_rows, grown_rows = hh_rows(tmp_path / "old.jsonl", lines[:1000]), hh_rows(tmp_path / "grown.jsonl", lines)
    limits = {"hh": 50}
    old = {c.context_id for c in eval_contexts(old_rows, None, 0, limits)}
    grown = {c.context_id for c in eval_contexts(grown_rows, None, 0, limits)}
    new_ids = {r["context_id"] for r in grown_rows} - {r["context_id"] for r in old_rows}
    assert len(old) == len(grown) == 50
    # an old pick leaves the sample only for a new row that ranks above it; every other one stays
    assert grown - old <= new_ids and len(old - grown) == len(grown & new_ids)
    assert old & grown  # (21 of 50 here: about the old rows' share of the grown set, as a hash rank gives)
    assert {c.context_id for c in eval_contexts(list(reversed(grown_rows)), None, 0, limits)} == grown
    assert {c.context_id for c in eval_contexts(grown_rows, None, 1, limits)} != grown  # the seed draws another
    # the set's own limit wins over contexts_per_source; the other sources keep that one
    mt = [{"source": "mt_bench", "context_id": f"mt_bench/{i}", "messages": [{"role": "user", "content": f"q{i}"}]}
          for i in range(10)]
    sources = [c.source for c in eval_contexts(grown_rows + mt, 3, 0, {"hh": 5, "heldout_seed": 0})]
    assert sources.count("hh") == 5 and sources.count("mt_bench") == 3
    with pytest.raises(ValueError, match="evaluation.max_contexts names hhh, which is no Best-of-N source"):
        eval_contexts(grown_rows, None, 0, {"hhh": 5})


def test_eval_items_loads_both_sets_as_prompt_only_sets(tmp_path):
    from music_assets.curation.assets import eval_items

    settings = load_settings_in(tmp_path, eval_sets={"hh": {"path": str(HH), "format": "hh_prompts"},
                                                     "ultrainteract": {"path": str(UI_SFT), "format": "ultrainteract"}},
                                evaluation={"max_contexts": {"hh": 1000, "ultrainteract": 1000}})
    assert settings.evaluation.max_contexts == {"hh": 1000, "ultrainteract": 1000}
    result = materialize([eval_items], resources=build_resources(settings))
    assert result.success
    rows = query(settings, "SELECT eval_set, kind, count(*), max(len(chosen)), max(len(rejected)) "
                           "FROM music.eval_items GROUP BY ALL ORDER BY eval_set")
    assert rows == [("hh", "prompts", 5, 1, 0), ("ultrainteract", "prompts", 4, 1, 0)]
    metadata = result.asset_materializations_for_node("eval_items")[0].metadata
    assert metadata["repeated_prompts_dropped"].value == {"hh": 1, "ultrainteract": 2}
    assert query(settings, "SELECT count(*) FROM music.eval_quarantine") == [(0,)]
    # and they are Best-of-N contexts: one user request each, nothing scripted after it
    bon = query(settings, "SELECT eval_set AS source, item_id AS context_id, chosen AS messages FROM music.eval_items")
    contexts = eval_contexts([dict(zip(("source", "context_id", "messages"), r)) for r in bon], None, 0,
                             settings.evaluation.max_contexts)
    assert len(contexts) == 9 and all(len(c.messages) == 1 and c.scripted_users == () for c in contexts)


def test_the_paper_config_form_of_the_sets_loads(tmp_path):
    settings = load_settings_in(tmp_path, eval_sets={
        "hh": {"path": str(HH_REAL), "format": "hh_prompts"},
        "ultrainteract": {"hf_dataset": "openbmb/UltraInteract_sft", "split": "train", "format": "ultrainteract"}})
    source = settings.data.eval_sets["ultrainteract"].source("ultrainteract")
    assert (source.location, source.format) == ("hf:openbmb/UltraInteract_sft:train", "ultrainteract")
    with pytest.raises(ValueError, match="max_contexts: every limit must be >= 0"):
        load_settings_in(tmp_path / "bad", evaluation={"max_contexts": {"hh": -1}})
