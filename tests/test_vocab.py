"""One definition of each word: the policy registries match the config's policy names, docs list
exactly the timeline events the code knows, and every event name the code writes or reads is
one of them (a typo would otherwise be a silent None in the metrics)."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

import pytest

from core.vocab import REQUEST_ID_RE, DecodePolicy, PrefillPolicy, request_id
from nodes.routing import DECODE_POLICIES, PREFILL_POLICIES
from nodes.timeline import EVENTS

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("nodes", "testbed", "sim", "fabric", "core") for p in (REPO / d).rglob("*.py")]


def test_policy_registries_are_the_config_vocabulary():
    assert set(PREFILL_POLICIES) == set(get_args(PrefillPolicy))
    assert set(DECODE_POLICIES) == set(get_args(DecodePolicy))


def test_request_ids_of_the_workload_match_the_pattern():
    assert request_id(12) == "r000012" and REQUEST_ID_RE.match(request_id(999_999))


def test_docs_list_exactly_the_timeline_events():
    text = (REPO / "docs" / "timeline.md").read_text()
    documented = {name for row in re.findall(r"^\| ([^|]+) \|", text, re.M) for name in re.findall(r"`(\w+)`", row)}
    assert documented == EVENTS, (sorted(documented - EVENTS), sorted(EVENTS - documented))


def _event_names(tree: ast.AST) -> set[str]:
    """String literals used as event names: ``x.event("name", ...)``, ``_first(evs, "name")``,
    and comparisons with ``e["event"]`` or a variable named ``ev``/``event``."""
    names: set[str] = set()

    def strings(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return []

    def is_event_ref(node: ast.AST) -> bool:
        if isinstance(node, ast.Name) and node.id in ("ev", "event"):
            return True
        return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                and node.slice.value == "event")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if fname == "event" and node.args:
                names.update(strings(node.args[0]))
            elif fname == "_first" and len(node.args) >= 2:
                names.update(strings(node.args[1]))
        elif isinstance(node, ast.Compare) and is_event_ref(node.left):
            for comp in node.comparators:
                names.update(strings(comp))
    return names


def test_every_event_name_in_the_code_is_a_known_event():
    unknown = {}
    for path in SOURCES:
        bad = _event_names(ast.parse(path.read_text())) - EVENTS
        if bad:
            unknown[str(path.relative_to(REPO))] = sorted(bad)
    assert not unknown, unknown


def test_the_request_id_pattern_is_defined_once():
    pattern = r"A-Za-z0-9_.-]{1,64}"
    defined = [str(p.relative_to(REPO)) for p in SOURCES if pattern in p.read_text()]
    # the broker's MQTT user names are node names, a different word with the same alphabet
    assert sorted(defined) == ["core/vocab.py", "testbed/broker.py"], defined
