"""Fixtures and environment shared by every test (helper functions live in helpers.py)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton: kernels run on the CPU in tests

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small ops on a tiny model (decoding, MTP): one thread is faster there, and immune to a
    busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
