import os

import pytest
import torch

os.environ.setdefault("BCU_PROGRESS", "0")
torch.set_num_threads(int(os.environ.get("BCU_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def synth():
    """A small learnable 1x28x28 task: (train, test)."""
    from bcu.data import make_synthetic

    return make_synthetic(1200, (1, 28, 28), 10, seed=0), make_synthetic(400, (1, 28, 28), 10, seed=1)
