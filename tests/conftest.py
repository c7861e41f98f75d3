"""Test-wide settings: one torch thread (the suite runs many small models; on a shared 2-core machine
extra threads only contend), and no model hub."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory):
    """family -> folder of its tiny random diffusers pipeline (``diffusers_helpers.build_pipeline``),
    each built once (lazily) per session."""
    from diffusers_helpers import build_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            build_pipeline(family, root / family)
            built[family] = str(root / family)
        return built[family]

    return get
