"""The simulation assets end to end on real vLLM (CPU): the tiny Llama for speed, one real run
of SmolLM2-135M-Instruct, and a SIGKILL in the middle of generation followed by a resume."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import duckdb
import pytest
import yaml
from dagster import DagsterInstance, materialize

from music_assets.assembly import SEED_ASSETS, build_resources
from music_assets.common.partitions import seed_partitions
from tests.helpers import ENGINE_COMPUTE, REPO, TINY_LLAMA, TINY_SIM, load_settings_in, query

pytestmark = pytest.mark.slow

TINY = {**TINY_LLAMA, "simulation": TINY_SIM}


def run_graph(settings, key="embedded"):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(seed_partitions.name, [key])
    return materialize(SEED_ASSETS, partition_key=key, instance=instance, resources=build_resources(settings))


def test_tiny_model_simulation_produces_contrastive_pairs(tmp_path):
    settings = load_settings_in(tmp_path, **TINY)
    result = run_graph(settings)
    assert result.success

    meta = {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("simulated_branches")}
    sim = meta["simulated_branches"]
    assert sim["contexts"].value == 8
    assert sim["tokens_generated"].value > 0 and sim["tokens_per_second"].value > 0
    completed = sim["contexts_completed"].value
    dropped = sum(sim["contexts_dropped"].value.values())
    assert completed + dropped == 8 and completed >= 4

    pairs = query(settings, "SELECT pair_id, contrast_turn, k, original_instruction, modified_instruction, "
                            "len(chosen), len(rejected), prefix_messages FROM music.music_pairs")
    assert len(pairs) == completed
    for _, c, k, original, modified, n_chosen, n_rejected, prefix in pairs:
        assert c in (1, 2) and k >= 1 and original != modified
        assert n_chosen == n_rejected == prefix - 1 + 2 * (3 - c + 1)
    # every completed context has exactly its rows: shared before c, chosen + rejected from c
    per_ctx = query(settings, "SELECT context_id, count(*) FILTER (branch = 'shared'), count(*) FILTER (branch = 'chosen'),"
                              " count(*) FILTER (branch = 'rejected'), any_value(contrast_turn) "
                              "FROM music.simulated_branches GROUP BY 1")
    for _, shared, chosen, rejected, c in per_ctx:
        assert shared <= c - 1 and chosen == rejected
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["private_instruction_not_visible"] and checks["no_empty_messages"]
    assert checks["rejected_differs_in_two_turns"]

    # rerunning a finished partition generates nothing
    again = run_graph(settings)
    sim2 = {m.asset_key.path[-1]: m.metadata for m in again.asset_materializations_for_node("simulated_branches")}
    assert sim2["simulated_branches"]["engine_requests"].value == 0
    assert sim2["simulated_branches"]["turns_resumed"].value == sim["dagster/row_count"].value


def test_sigkill_mid_generation_then_resume(tmp_path):
    config = {"home": str(tmp_path / "home"), **TINY,
              "simulation": {**TINY_SIM, "max_contexts": 72, "turns": 4}}
    cfg = tmp_path / "music.yaml"
    cfg.write_text(yaml.safe_dump(config))
    settings = load_settings_in(tmp_path, **{k: v for k, v in config.items() if k != "home"})
    env = {**os.environ, "MUSIC_CONFIG": str(cfg), "DAGSTER_HOME": str(tmp_path / "dh")}
    (tmp_path / "dh").mkdir()
    child = subprocess.Popen([sys.executable, "-m", "music_assets.cli", "demo", "--skip-training"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert child.poll() is None, "the run ended before it could be killed"
            if _turns_committed(settings) >= 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no turn committed within 10 minutes")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    snapshot = query(settings, "SELECT turn_key, user_message, assistant_message, created_at FROM music.simulated_branches")
    max_turn = query(settings, "SELECT max(turn) FROM music.simulated_branches")[0][0]
    assert snapshot and max_turn < 4, "killed after the simulation had finished: nothing to resume"

    result = run_graph(settings)
    assert result.success
    sim = {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("simulated_branches")}
    assert sim["simulated_branches"]["turns_resumed"].value == len(snapshot)
    after = query(settings, "SELECT turn_key, user_message, assistant_message, created_at FROM music.simulated_branches")
    keys = [r[0] for r in after]
    assert len(keys) == len(set(keys))  # no duplicates
    assert set(snapshot) <= set(after)  # every committed turn kept as it was, not regenerated
    done = query(settings, "SELECT count(*) FROM music.music_pairs")[0][0]
    assert done == sim["simulated_branches"]["contexts_completed"].value > 0


def _turns_committed(settings) -> int:
    try:
        return query(settings, "SELECT count(DISTINCT turn) FROM music.simulated_branches")[0][0]
    except (duckdb.IOException, duckdb.CatalogException):
        return 0  # file locked by the writer for a moment, or the table does not exist yet


# SmolLM2 writes other text in bf16 (CPUs with AVX512-BF16: vLLM's `dtype: auto`) than in fp32
# (AVX2-only CPUs), and about half of its contexts are dropped either way (answers and user
# messages cut at max tokens, retried, then dropped). Measured on the embedded seeds with these
# settings (the product's default lengths): 4 of 8 contexts completed in bf16 and 4 of 8 in fp32.
# With 4 contexts and shorter lengths, bf16 completed none. MUSIC_TEST_VLLM_DTYPE=float32 (or
# bfloat16) forces the other dtype in a run.
SMOLLM2_CONTEXTS = 8


def test_smollm2_simulation_integration(tmp_path):
    """The real default model end to end, on the product's default generation lengths: every
    context is accounted for (completed or dropped with a reason), every completed one has
    its full chosen and rejected branches and exactly one MUSIC pair, and the checks pass."""
    settings = load_settings_in(
        tmp_path,
        models={"default": {"backend": "vllm", "model": "builtin:smollm2"}},
        compute=ENGINE_COMPUTE,
        simulation={"max_contexts": SMOLLM2_CONTEXTS, "turns": 2, "min_contrast_turns": 2},
    )
    result = run_graph(settings)
    assert result.success
    sim = {m.asset_key.path[-1]: m.metadata for m in result.asset_materializations_for_node("simulated_branches")}
    s = sim["simulated_branches"]
    completed, dropped = s["contexts_completed"].value, s["contexts_dropped"].value
    assert s["contexts"].value == SMOLLM2_CONTEXTS == completed + sum(dropped.values())
    assert completed >= 1
    # each dropped context is recorded once, with its stage and reason, and none of them has a pair
    drops = query(settings, "SELECT context_id, stage, reason, last_output FROM music.simulation_drops")
    assert len(drops) == len({d[0] for d in drops}) == sum(dropped.values())
    assert Counter(d[2] for d in drops) == Counter(dropped) and all(d[1] for d in drops)
    assert s["tokens_generated"].value > 0 and s["engine_requests"].value >= 4 * SMOLLM2_CONTEXTS

    pairs = query(settings, "SELECT context_id, contrast_turn, original_instruction, modified_instruction, "
                            "len(chosen), len(rejected), prefix_messages, chosen[-1].content, rejected[-1].content "
                            "FROM music.music_pairs")
    assert len(pairs) == completed and len({p[0] for p in pairs}) == completed
    assert not {p[0] for p in pairs} & {d[0] for d in drops}
    branches = {r[0]: r[1:] for r in query(
        settings, "SELECT context_id, count(*) FILTER (branch = 'shared'), count(*) FILTER (branch = 'chosen'), "
                  "count(*) FILTER (branch = 'rejected') FROM music.simulated_branches GROUP BY 1")}
    for cid, c, original, modified, n_chosen, n_rejected, prefix, chosen_last, rejected_last in pairs:
        assert c == 1  # T = 2 with 2 flawed turns: the contrast is at the first simulated turn
        assert original.strip() and modified.strip() and original != modified
        assert n_chosen == n_rejected == prefix - 1 + 2 * 2  # seed context, then 2 simulated exchanges
        assert chosen_last.strip() and rejected_last.strip() and chosen_last != rejected_last
        assert branches[cid] == (0, 2, 2)  # no shared turn before c = 1, both branches for both turns
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["some_contexts_completed"] and checks["private_instruction_not_visible"]
    assert checks["no_empty_messages"] and checks["rejected_differs_in_two_turns"]
