"""Routing policies: eligibility, round robin fallback, load and KV ranking, staleness correction."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from nodes.config import RouterSettings
from nodes.routing import DECODE_POLICIES, PREFILL_POLICIES, KvAware, LeastLoaded, RoundRobin, make_policy

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


@dataclass(frozen=True)
class Node:
    name: str


NODES = [Node("a"), Node("b"), Node("c")]


def picks(policy, status=lambda n: None, n=6, **kw):
    return [policy.choose(NODES, status, **kw).name for _ in range(n)]


def test_registry_matches_config_choices():
    prefill = RouterSettings.model_fields["prefill_policy"].annotation.__args__
    decode = RouterSettings.model_fields["decode_policy"].annotation.__args__
    assert set(PREFILL_POLICIES) == set(prefill) and set(DECODE_POLICIES) == set(decode)
    assert isinstance(make_policy("decode", "kv_aware", kv_bytes_per_token=10), KvAware)
    with pytest.raises(ValueError, match="kv_aware"):
        make_policy("prefill", "kv_aware")


def test_round_robin_skips_offline_and_draining():
    assert picks(RoundRobin()) == ["a", "b", "c", "a", "b", "c"]
    status = {"b": {"state": "draining"}, "c": {"state": "up", "queue_depth": 0}}.get
    assert picks(RoundRobin(), status, 4) == ["a", "c", "a", "c"]
    assert RoundRobin().choose(NODES, {"a": {"state": "offline"}, "b": {"state": "offline"},
                                       "c": {"state": "draining"}}.get) is None
    assert RoundRobin().choose([], lambda n: None) is None


@pytest.mark.parametrize("cls", [LeastLoaded, KvAware])
def test_load_policies_fall_back_to_round_robin(cls):
    assert picks(cls()) == ["a", "b", "c", "a", "b", "c"]
    only_offline = {"a": {"state": "offline"}}.get
    assert picks(cls(), only_offline, 4) == ["b", "c", "b", "c"]


def test_least_loaded():
    future = time.time() + 100  # reports "newer" than any send: no correction
    status = {"a": {"state": "up", "queue_depth": 5, "batch_size": 5, "t_wall": future},
              "b": {"state": "up", "queue_depth": 0, "batch_size": 3, "t_wall": future},
              "c": {"state": "draining", "queue_depth": 0, "batch_size": 0, "t_wall": future}}.get
    assert picks(LeastLoaded(), status, 3) == ["b", "b", "b"]


def test_least_loaded_counts_sends_since_the_last_report():
    past = time.time() - 1
    reports = {"a": {"state": "up", "queue_depth": 0, "batch_size": 0, "t_wall": past},
               "b": {"state": "up", "queue_depth": 1, "batch_size": 0, "t_wall": past},
               "c": {"state": "up", "queue_depth": 2, "batch_size": 0, "t_wall": past}}
    policy = LeastLoaded()
    # a 0 -> a 1 ties b 1 (a first) -> a 2 > b 1 -> b ...: the burst spreads instead of piling on a
    chosen = picks(policy, reports.get, 6)
    assert chosen.count("a") == 3 and chosen.count("b") == 2 and chosen.count("c") == 1
    reports["a"] = {"state": "up", "queue_depth": 0, "batch_size": 0, "t_wall": time.time() + 1}
    assert policy.choose(NODES, reports.get).name == "a"  # the new report covers the earlier sends


def test_kv_aware():
    future = time.time() + 100
    status = {"a": {"state": "up", "kv_free_bytes": 100, "t_wall": future},
              "b": {"state": "up", "kv_free_bytes": 900, "t_wall": future},
              "c": {"state": "offline", "kv_free_bytes": 10**15}}.get
    assert picks(KvAware(), status, 3) == ["b", "b", "b"]
    tie = {"a": {"state": "up", "kv_free_bytes": 5, "batch_size": 3, "t_wall": future},
           "b": {"state": "up", "kv_free_bytes": 5, "batch_size": 1, "t_wall": future}}.get
    assert KvAware().choose(NODES[:2], tie).name == "b"


def test_kv_aware_subtracts_kv_sent_since_the_report():
    past = time.time() - 1
    status = {"a": {"state": "up", "kv_free_bytes": 1000, "t_wall": past},
              "b": {"state": "up", "kv_free_bytes": 800, "t_wall": past}}.get
    policy = KvAware(kv_bytes_per_token=1)
    assert [policy.choose(NODES[:2], status, tokens=300).name for _ in range(3)] == ["a", "b", "a"]
    blind = KvAware()  # bytes per token unknown: only the reported capacity and the load count
    assert [blind.choose(NODES[:2], status, tokens=300).name for _ in range(2)] == ["a", "a"]
