"""Shared fixtures. Model folders and exports are cached for the whole run (session scope)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# One cache per checkout: the converted built-in model is reused across tests and runs.
os.environ.setdefault("EDGEKV_CACHE", os.path.join(ROOT, ".cache", "edgekv"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family -> folder of a tiny random HF model (built once per run)."""
    from tiny_models import make_tiny_model

    base = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = make_tiny_model(family, str(base / family))
        return cache[family]

    return get
