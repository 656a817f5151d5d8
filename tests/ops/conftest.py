"""Ops tests run torch on one thread: their tensors are tiny, and with ``pytest -n 2`` on a
2-core machine two workers with two threads each oversubscribe the cores."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
