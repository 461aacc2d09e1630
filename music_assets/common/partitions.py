"""Partitions shared by the asset graph."""

from dagster import DynamicPartitionsDefinition

# One partition per registered seed source (embedded sample, local file, HF dataset id), so a new
# source is ingested and simulated alone and existing ones are never regenerated for it.
seed_partitions = DynamicPartitionsDefinition(name="seed_sources")
