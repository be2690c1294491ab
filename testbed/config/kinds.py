"""Every config kind a file can declare with its top-level ``kind:`` key, and ``load_any``.

The kinds live with their owners (nodes/, fabric/, testbed/); this top-layer module is the one
place that knows them all. A loader (path -> object) adds checks a schema alone cannot make: a
scenario's references to its topology, profiles and trace resolve relative to the scenario file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from core.config import ConfigError, load_model, read_yaml
from fabric.topology import TopologyConfig
from nodes.profiles.hardware import HardwareProfile
from nodes.profiles.models import ModelProfile
from testbed.compare import DeploymentSpec, WorkloadProfile, load_comparison
from testbed.config.scenario import load_scenario

CONFIG_KINDS: dict[str, type[BaseModel] | Callable[[str | Path], BaseModel]] = {
    "hardware": HardwareProfile,
    "model": ModelProfile,
    "topology": TopologyConfig,
    "scenario": load_scenario,
    "deployment": DeploymentSpec,
    "workload": WorkloadProfile,
    "comparison": lambda path: load_comparison(path).config,
}


def load_any(path: str | Path) -> tuple[str, BaseModel]:
    """Validate a config file of any kind, named by its top-level ``kind`` key."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", f"expected a mapping with a 'kind' key, got {type(data).__name__}")])
    kind = data.get("kind")
    if kind not in CONFIG_KINDS:
        raise ConfigError(str(path), [("kind", f"expected one of {', '.join(CONFIG_KINDS)}, got {kind!r}")])
    target = CONFIG_KINDS[kind]
    if isinstance(target, type) and issubclass(target, BaseModel):
        return kind, load_model(target, path)
    return kind, target(path)
