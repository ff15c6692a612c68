"""Shared fixtures. Model folders and exports are cached for the whole run (session scope)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from tiny_models import FAMILIES  # noqa: E402

pytest_plugins = ["conftest_export"]

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


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    """(model, **export options) -> artifacts folder, exported once per run.

    ``model`` is a tiny family name (llama, qwen2, gemma) or a built-in name.
    """
    cache: dict = {}

    def get(model: str, **options) -> str:
        from edgekv.export.pipeline import export_model

        key = (model, tuple(sorted(options.items())))
        if key not in cache:
            src = tiny_model_dir(model) if model in FAMILIES else model
            out = tmp_path_factory.mktemp(f"export-{model}") / "artifacts"
            export_model(src, str(out), progress=False, **options)
            cache[key] = str(out)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def backbone(tiny_model_dir):
    """(model) -> edgekv Backbone, loaded once per run."""
    cache: dict = {}

    def get(model: str):
        from edgekv.host.models import load_backbone

        if model not in cache:
            src = tiny_model_dir(model) if model in FAMILIES else model
            cache[model] = load_backbone(src)
        return cache[model]

    return get
