"""Shared pytest configuration: the hypothesis profiles.

Select one with ``HYPOTHESIS_PROFILE=ci`` (default: ``default``). Both run 50
examples per property with no per-example deadline (the first call of a
property may build and cache Hadamard matrices); ``ci`` is also derandomized
so a CI failure reproduces exactly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

settings.register_profile("default", **_COMMON)
settings.register_profile("ci", derandomize=True, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
