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


@pytest.fixture(scope="module")
def net():
    """A small untrained grayscale classifier (fixed seed)."""
    from bcu.models import create_model

    torch.manual_seed(0)
    return create_model("cnn-small", 10, (1, 28, 28), mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, net):
    """``net`` saved as a bcu model folder (safetensors + sidecar)."""
    from bcu.checkpoint import save_model

    d = tmp_path_factory.mktemp("model")
    save_model(net, d)
    return d


@pytest.fixture(scope="module")
def small_teacher():
    """cnn-small (width 0.5, BatchNorm) trained for two epochs on the synthetic task (its BatchNorm
    statistics too), in eval mode."""
    from bcu.data import make_synthetic
    from bcu.models import create_model
    from bcu.train import OptimConfig, cross_entropy_objective, fit

    torch.manual_seed(0)
    m = create_model("cnn-small", 10, (1, 28, 28), width=0.5)
    fit(m, make_synthetic(600, seed=0), cross_entropy_objective, OptimConfig(epochs=2, batch_size=32, lr=0.05),
        augment_cfg=None, progress=False)
    return m.eval()
