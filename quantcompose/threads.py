"""A context manager that caps torch's intra-op threads for sequential, small-op loops."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Run the block with at most ``threads`` intra-op threads (None: leave torch's setting).

    Loops of many small ops (DuQuant's greedy rotation search, GPTQ's column
    sweep) gain nothing from a second thread and lose to OpenMP's start-up and
    spin-waiting: on the 2-core machine GPTQ's sweep ran 1.6x faster on one.
    """
    before = torch.get_num_threads()
    if threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
