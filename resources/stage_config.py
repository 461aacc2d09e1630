"""The stages' config classes as Dagster resources, derived field by field.

Each stage's settings are written once, as a dataclass in its package (`SimulationConfig`,
`CurationConfig`, `TrainingConfig`, `EvaluationConfig`). Assets receive them as resources, so one
YAML config sets them for the demo, the UI, sensors and schedules alike. A resource class here is
built from the dataclass: the same field names, types, defaults and help texts (the UI shows them
as the resource's config schema), nested config classes as nested Dagster `Config` classes. There
is nothing to keep in step by hand. An asset calls `.settings()` to get the dataclass back,
validated again (a value set in the launchpad is checked like one from the YAML file).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from dagster import Config, ConfigurableResource
from pydantic import Field, create_model

from music_assets.common.config import config_fields, field_types, from_mapping, nested_config
from music_assets.curation.config import CurationConfig
from music_assets.evaluation.config import EvaluationConfig
from music_assets.simulation.config import SimulationConfig
from music_assets.training.config import TrainingConfig


class StageConfigResource(ConfigurableResource):
    """A resource whose fields are a stage config class's fields."""

    @classmethod
    def config_class(cls) -> type:
        return cls._config_class_

    def settings(self) -> Any:
        """The stage's config object, as logic takes it."""
        return from_mapping(self.config_class(), self.model_dump())


def _derived(cls: type, base: type, name: str, doc: str | None = None) -> type:
    fields: dict[str, Any] = {}
    types_ = field_types(cls)
    for fname, f in config_fields(cls).items():
        tp = types_[fname]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING:  # a required setting
            fields[fname] = (tp, Field(description=f.metadata.get("help")))
            continue
        nested = nested_config(tp)
        if nested:
            kind, inner = nested
            inner_cfg = _derived(inner, Config, f"{inner.__name__}Config" if base is not Config else inner.__name__)
            if kind == "one":
                tp = inner_cfg | None if typing.get_origin(tp) is not None else inner_cfg
                default = None if default is None else inner_cfg(**dataclasses.asdict(default))
            else:
                tp = dict[str, inner_cfg]
                default = {k: inner_cfg(**dataclasses.asdict(v)) for k, v in default.items()}
        fields[fname] = (tp, Field(default=default, description=f.metadata.get("help")))
    model = create_model(name, __base__=base, __module__=__name__, __doc__=doc, **fields)
    type.__setattr__(model, "_config_class_", cls)
    return model


def stage_resource(cls: type, name: str) -> type[StageConfigResource]:
    """A `StageConfigResource` subclass named `name` with the fields of config class `cls`."""
    own = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else ""
    doc = f"{own}\n\nThe settings of {cls.__module__}.{cls.__name__}, as a Dagster resource.".strip()
    return _derived(cls, StageConfigResource, name, doc)


SimulationResource = stage_resource(SimulationConfig, "SimulationResource")
CurationResource = stage_resource(CurationConfig, "CurationResource")
TrainingResource = stage_resource(TrainingConfig, "TrainingResource")
EvaluationResource = stage_resource(EvaluationConfig, "EvaluationResource")
