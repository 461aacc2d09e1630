"""The Dagster code location (`dagster dev -w workspace.yaml`): the five stages' assets, the
automation, and the resources the config names (`MUSIC_CONFIG`), put together by
`music_assets/assembly.py`. Each stage lives in its own package: seeds, simulation, curation,
training, evaluation."""

from music_assets.assembly import build_definitions
from music_assets.settings import load_settings

defs = build_definitions(load_settings())
