"""limited_threads caps torch's intra-op threads and always restores them."""

from __future__ import annotations

import pytest
import torch

from quantcompose.threads import limited_threads


def test_limits_and_restores():
    before = torch.get_num_threads()
    with limited_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_none_or_more_threads_change_nothing():
    before = torch.get_num_threads()
    for threads in (None, before, before + 4):
        with limited_threads(threads):
            assert torch.get_num_threads() == before


def test_restores_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with limited_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
