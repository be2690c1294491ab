"""Loading YAML configs into validated, typed objects with one-line errors.

Every config kind (hardware, model, topology, scenario) is a pydantic model derived
from :class:`StrictModel`: unknown keys are refused and values are typed. Errors are
reported as ``FILE: key.path: what was expected`` so a user can fix a file without
reading a traceback.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config object: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(Exception):
    """A config that cannot be used. ``str()`` is one line per problem, each naming file and key path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {path or '<top>'}: {msg}" for path, msg in problems))


_SAFE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")


def _check_name(value: str) -> str:
    if not _SAFE_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-32 characters of lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-'"
        )
    return value


SafeName = Annotated[str, AfterValidator(_check_name)]
"""A name that may reach a command line, a file name or an MQTT topic: validated, never trusted."""

_NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")


def _check_node_name(value: str) -> str:
    if not _NODE_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid host name: use 1-10 lowercase letters and digits, starting with a letter "
            "(it becomes part of Linux interface names, which are limited to 15 characters)"
        )
    return value


NodeName = Annotated[str, AfterValidator(_check_node_name)]
"""A host/node name from a topology: short enough to build interface names from."""


def key_path(loc: tuple[int | str, ...]) -> str:
    """``('hosts', 2, 'name')`` -> ``'hosts[2].name'``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def problems_from_validation(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        # pydantic puts the tag of a tagged union or a function-validator name in loc: drop non-keys
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        path = key_path(loc)
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        problems.append((path, msg))
    return problems


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning syntax errors into a :class:`ConfigError` with line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read file: {exc.strerror}")]) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(str(path), [("", f"invalid YAML at {where}: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("", f"invalid YAML: {exc}")]) from None


def validate_data(model: type[M], data: Any, source: str, prefix: str = "") -> M:
    """Validate already-parsed data, reporting problems against ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(source, [(prefix, f"expected a mapping of keys, got {type(data).__name__}")])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, problems_from_validation(err, prefix)) from None


def load_model(model: type[M], path: str | Path) -> M:
    """Read ``path`` and validate it as ``model``. A top-level ``kind`` key must match if present."""
    data = read_yaml(path)
    if isinstance(data, dict) and "kind" in data:
        expected = getattr(model, "KIND", None)
        if expected and data["kind"] != expected:
            raise ConfigError(str(path), [("kind", f"expected {expected!r} here, got {data['kind']!r}")])
        data = {k: v for k, v in data.items() if k != "kind"}
    return validate_data(model, data, str(path))
