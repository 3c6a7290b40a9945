"""Kernel tests run on CUDA when present, else in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before the kernels are *defined* (Triton's
``@triton.jit`` picks compiled vs. interpreted at decoration time; the
``quantcompose_kernels`` package defers that to the first kernel call), so it is
set here, at conftest import, before any test module imports triton.
``test_interpreter_mode_is_active`` verifies it took effect.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _CUDA = False

if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
SKIP_REASON = "triton is not importable (pip install 'quantcompose[triton]'); kernel tests need it"
DEVICE = "cuda" if _CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_triton: runs a Triton kernel (skipped without triton)")


def pytest_collection_modifyitems(config, items):
    if HAS_TRITON:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if str(item.fspath).startswith(here) and item.get_closest_marker("needs_triton"):
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
