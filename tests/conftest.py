"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def torch_float32_one_thread():
    """float32 default dtype and one torch thread for a module, restored afterwards: the tiny models of the export
    and timm tests fit in ~3 s with one thread and up to 10x longer with two on a busy 2-core machine."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
