"""Shared pytest set-up: marker handling and the prepared real model.

Markers (declared in pyproject.toml): ``engine`` (starts a vLLM engine), ``slow``, ``gpu`` (needs CUDA),
``model`` (needs the prepared SmolLM2). The default run selects all of them; ``gpu`` tests are skipped
where CUDA is unavailable and ``engine`` tests where vLLM is not installed (``setup.sh --no-vllm``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
            for item in gpu_items:
                item.add_marker(skip)
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vLLM is not installed (set up without --no-vllm to run it)")
        for item in items:
            if "engine" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def prepared_model() -> Path:
    """Path of the converted SmolLM2-135M-Instruct checkpoint in the default cache (converted once)."""
    from cam_vllm.models import prepare_model

    return prepare_model()
