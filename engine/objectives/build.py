"""The objective a run trains with, from its family (SiT, DiT) or MeanFlow."""
from __future__ import annotations

from typing import Literal

from engine.diffusion.gaussian import DiffusionConfig
from engine.diffusion.transport import TransportConfig
from engine.objectives.base import Objective
from engine.objectives.dispersive import DispersiveConfig, DispersivePreset
from engine.objectives.dit import DiTObjective
from engine.objectives.meanflow import MeanFlowConfig, MeanFlowObjective
from engine.objectives.sit import SiTObjective


def build_objective(family: Literal["sit", "dit", "meanflow"], *, transport: TransportConfig | None = None,
                    diffusion: DiffusionConfig | None = None, meanflow: MeanFlowConfig | None = None,
                    dispersive: DispersiveConfig | str | None = None) -> Objective:
    """The objective of a model family (or MeanFlow on a SiT); ``dispersive`` may be a config or
    a preset name. Each family takes only its own settings."""
    if isinstance(dispersive, (str, DispersivePreset)):
        dispersive = DispersiveConfig.preset(dispersive)
    dispersive = dispersive if dispersive is not None else DispersiveConfig()
    given = {"transport": transport, "diffusion": diffusion, "meanflow": meanflow}
    own = {"sit": "transport", "dit": "diffusion", "meanflow": "meanflow"}
    if family not in own:
        raise ValueError(f"unknown objective family {family!r}; valid: 'sit', 'dit', 'meanflow'")
    foreign = [k for k, v in given.items() if v is not None and k != own[family]]
    if foreign:
        raise ValueError(f"{foreign[0]}= is not a setting of the {family} objective; it takes {own[family]}=")
    if family == "sit":
        return SiTObjective(dispersive=dispersive, transport=transport or TransportConfig())
    if family == "dit":
        return DiTObjective(dispersive=dispersive, diffusion=diffusion or DiffusionConfig())
    return MeanFlowObjective(dispersive=dispersive, config=meanflow or MeanFlowConfig())
