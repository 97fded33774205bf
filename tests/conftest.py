"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors run as fast on one thread, and two OpenMP threads on a 2-core machine shared with other test
    processes can stall on each other (measured: 1000 tiny matmuls took 15 s instead of 0.01 s). A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
