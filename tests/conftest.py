"""Shared pytest fixtures."""

import numpy as np
import pytest
import torch
from helpers import QUICK_FIT


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


@pytest.fixture(scope="module")
def digits(torch_float32_one_thread):
    """scikit-learn's digits as (1797, 8, 8) float32 images, with float32 and one torch thread for the module (a
    test module may define its own ``digits``)."""
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32)


@pytest.fixture(scope="module")
def quick_digits_model(digits):
    """A DCSS fitted on the digits in ~2 s (3 / 2 / 2 epochs): for tests of what is done with a fitted model."""
    from dcss_plugin import DCSS

    return DCSS(n_clusters=10, **QUICK_FIT).fit(digits)
