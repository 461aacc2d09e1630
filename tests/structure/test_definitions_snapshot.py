"""The asset graph, pinned: every asset's key, dependencies, group, partitions, code version,
automation condition, pool, resources and checks, and the jobs and sensors, of the Definitions
built from the default settings. Any change to the graph (a moved asset, a renamed check, an
edited prompt, which changes `simulated_branches`' code version and those of everything after
it) shows as a diff of tests/snapshots/definitions.json in review.

After an intended change, write the snapshot again and commit the diff with the change:
    MUSIC_UPDATE_SNAPSHOT=1 ./scripts/test.sh tests/structure/test_definitions_snapshot.py
"""

import json
import os

from dagster import AssetsDefinition, Definitions

from music_assets.assembly import build_definitions
from tests.helpers import REPO, load_settings_in

SNAPSHOT = REPO / "tests" / "snapshots" / "definitions.json"


def _partitions(partitions_def) -> dict | None:
    if partitions_def is None:
        return None
    described = {"type": type(partitions_def).__name__}
    if getattr(partitions_def, "name", None):  # dynamic: the keys live in the instance
        described["name"] = partitions_def.name
    else:
        described["keys"] = list(partitions_def.get_partition_keys())
    return described


def _asset(assets_def: AssetsDefinition, spec) -> dict:
    return {
        "deps": sorted(dep.asset_key.to_user_string() for dep in spec.deps),
        "group": spec.group_name,
        "code_version": spec.code_version,
        "partitions": _partitions(spec.partitions_def),
        "automation": spec.automation_condition.get_label() if spec.automation_condition else None,
        "computed_with": sorted(k.to_user_string() for k in assets_def.keys),  # assets of one op
        "pool": assets_def.op.pool,
        "resources": sorted(assets_def.required_resource_keys),
        "checks": sorted([c.name, c.blocking] for c in assets_def.check_specs if c.asset_key == spec.key),
    }


def snapshot(defs: Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {spec.key.to_user_string(): _asset(a, spec) for a in defs.assets for spec in a.specs}
    jobs = {job.name: sorted(k.to_user_string() for k in job.selection.resolve(graph)) for job in defs.jobs}
    sensors = {s.name: {"type": type(s).__name__, "default_status": s.default_status.value,
                        "minimum_interval_seconds": s.minimum_interval_seconds} for s in defs.sensors}
    return {"assets": dict(sorted(assets.items())), "jobs": jobs, "sensors": sensors,
            "resources": sorted(defs.resources)}


def test_definitions_match_the_snapshot(tmp_path):
    current = snapshot(build_definitions(load_settings_in(tmp_path)))
    text = json.dumps(current, indent=2) + "\n"
    if os.environ.get("MUSIC_UPDATE_SNAPSHOT"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), f"no snapshot yet: run with MUSIC_UPDATE_SNAPSHOT=1 to write {SNAPSHOT}"
    pinned = json.loads(SNAPSHOT.read_text())
    changed = sorted(k for k in pinned["assets"].keys() | current["assets"].keys()
                     if pinned["assets"].get(k) != current["assets"].get(k))
    assert current == pinned, (f"the asset graph differs from {SNAPSHOT.name} (assets changed: {changed}); "
                               "if intended, run with MUSIC_UPDATE_SNAPSHOT=1 and commit the diff")
