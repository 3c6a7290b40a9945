"""Shared pytest configuration: the hypothesis profiles and a one-thread fixture.

Select one with ``HYPOTHESIS_PROFILE=ci`` (default: ``default``). Both run 50
examples per property with no per-example deadline (the first call of a
property may build and cache Hadamard matrices); ``ci`` is also derandomized
so a CI failure reproduces exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

settings.register_profile("default", **_COMMON)
settings.register_profile("ci", derandomize=True, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One torch thread for a module of many tiny ops, which only pay thread sync overhead otherwise.

    Use with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
