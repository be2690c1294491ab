"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked `root` build network namespaces, shape links and start tcpdump. CI runs as root,
    # so they run there; a developer without root gets a skip with the reason instead of a failure.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, tc, iptables); CI runs as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_trace() -> Path:
    """The Azure code trace of ../shared, beside the checkout (as in CI); skipped without it."""
    path = REPO.parent / "shared" / "traces" / "azure_llm_2023_code.csv"
    if not path.exists():
        pytest.skip("shared trace not beside the checkout")
    return path
