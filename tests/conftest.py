"""Shared test fixtures.

`../shared` (beside the repository) holds read-only reference fixtures. Tests that need it skip when it is
absent, except under CI=true, where its absence is a failure.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
DATA = REPO / "data_processing"
SHARED = REPO.parent / "shared"

for p in (DEMO, DATA):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _require_shared() -> Path:
    if SHARED.is_dir():
        return SHARED
    if os.environ.get("CI") == "true":
        pytest.fail(f"../shared is missing ({SHARED}); CI must run with the shared fixtures beside the clone")
    pytest.skip(f"../shared not found at {SHARED}")


@pytest.fixture(scope="session")
def shared() -> Path:
    """Path to the read-only ../shared fixtures (skip, or fail under CI=true, when absent)."""
    return _require_shared()
