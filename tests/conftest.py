import pytest
import torch

from tests.helpers.thirdparty import import_torchvision

import_torchvision()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
