"""Hardware and model profiles, shipped as YAML under ``data/`` and loaded by name or path."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from core.config import ConfigError, load_model as _load_config

from nodes.profiles.hardware import HardwareProfile
from nodes.profiles.models import ModelProfile

DATA_DIR = Path(__file__).resolve().parent / "data"
HARDWARE_DIR = DATA_DIR / "hardware"
MODEL_DIR = DATA_DIR / "models"

__all__ = ["HardwareProfile", "ModelProfile", "load_hardware", "load_model", "hardware_names", "model_names",
           "DATA_DIR"]


def hardware_names() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path, directory: Path, names: list[str], what: str) -> Path:
    text = str(name_or_path)
    if text in names:
        return directory / f"{text}.yaml"
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or "/" in text:
        return path
    raise ConfigError(text, [("name", f"no {what} profile named {text!r}; known: {', '.join(names)} (or give a .yaml path)")])


@lru_cache(maxsize=64)
def _load_shipped(cls: type, path: str) -> object:
    loaded = _load_config(cls, path)
    stem = Path(path).stem
    if loaded.name != stem:
        raise ConfigError(path, [("name", f"a shipped profile's name must match its file name {stem!r}")])
    return loaded


def _load(cls: type, path: Path) -> object:
    """Shipped profiles are read once per process; other files on every call (they may change)."""
    if path.resolve().parent in (HARDWARE_DIR, MODEL_DIR):
        return _load_shipped(cls, str(path.resolve()))
    return _load_config(cls, path)


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A shipped hardware profile by name (``trn2``) or any hardware YAML by path."""
    return _load(HardwareProfile, _resolve(name_or_path, HARDWARE_DIR, hardware_names(), "hardware"))


def load_model(name_or_path: str | Path) -> ModelProfile:
    """A shipped model profile by name (``llama-3.1-70b``) or any model YAML by path."""
    return _load(ModelProfile, _resolve(name_or_path, MODEL_DIR, model_names(), "model"))
