"Shared fixtures: small real images (scikit-learn digits) and a tiny SwAV setup, fast on 2 CPU cores."
import os
import warnings
import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
# one torch thread per pytest-xdist worker (two workers on two cores: more threads wait on each other and times
# triple), both cores for a plain serial run
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same random state, whichever tests ran before it in its (xdist worker) process"
    import random
    import numpy as np
    random.seed(0); np.random.seed(0); torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_at():
    "`digits_at(size)`: (images, labels) of the scikit-learn digits at `size` px, each size made once per session"
    from functools import cache
    from self_supervised_swav.data import digits_images
    return cache(lambda size: digits_images(size=size))


@pytest.fixture(scope="session")
def digits(digits_at): return digits_at(24)


def digits_dls(digits: tuple, n: int, bs: int):
    "DataLoaders of the first `n` digits, 80 % train / 20 % valid, on the CPU"
    from self_supervised_swav.data import image_tensor_dls
    x, y = digits
    return image_tensor_dls(x[:n], y[:n], valid_pct=0.2, bs=bs, device="cpu")


@pytest.fixture
def tiny_dls(digits):
    "160 train / 40 valid gray 24 px digits, batches of 32 (train batches: 5, no partial batch)"
    return digits_dls(digits, 200, 32)


def pytest_configure(config):
    "Third-party deprecation noise (torch.jit, pandas, numpy via fastai/matplotlib) hides real warnings"
    for w in ("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning:torch.*"):
        config.addinivalue_line("filterwarnings", w)
    config.addinivalue_line("filterwarnings", "ignore:.*mode.chained_assignment.*")
