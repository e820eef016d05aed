"Shared fixtures: small real images (scikit-learn digits) and a tiny SwAV setup, fast on 2 CPU cores. Helpers: `helpers.py`."
import os
import warnings
import pytest
import torch

from helpers import digits_dls

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
def digits(digits_at):
    "All 1797 digits at 24 px: (images [N, 1, 24, 24] in [0, 1], labels)"
    return digits_at(24)


@pytest.fixture(scope="session")
def digits64(digits_at):
    "The first 64 digits at 16 px (48 training images in 3 batches of 16 with `valid_pct=0.25`): the resume tests' data"
    x, y = digits_at(16)
    return x[:64], y[:64]


@pytest.fixture
def tiny_dls(digits):
    "160 train / 40 valid gray 24 px digits, batches of 32 (train batches: 5, no partial batch)"
    return digits_dls(digits, 200, 32)


def pytest_configure(config):
    "Third-party deprecation noise (torch.jit, pandas, numpy via fastai/matplotlib) hides real warnings"
    for w in ("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning:torch.*"):
        config.addinivalue_line("filterwarnings", w)
    config.addinivalue_line("filterwarnings", "ignore:.*mode.chained_assignment.*")


@pytest.fixture(scope="session")
def photographs():
    "Real photographs of mixed sizes: the distinct JPEGs of Debian's plasma-workspace-wallpapers (skipped when not installed)"
    from pathlib import Path
    folder = Path("/usr/share/wallpapers")
    files = sorted({f.resolve() for f in folder.rglob("*.jpg")}) if folder.is_dir() else []
    if not files: pytest.skip("no photographs: apt-get install -y plasma-workspace-wallpapers")
    return files
