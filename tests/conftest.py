import sys

import pytest
import torch

from tests.helpers.thirdparty import import_torchvision

import_torchvision()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (the calibration sets' figures are measured so), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_compiled_graphs():
    """What a fresh process has: no graph that Dynamo traced through torchdiag's pre-hook, which would keep that hook
    on at steps not recorded (``GlobalHooks.traced``, kept across watches): Dynamo reset, and torchdiag told so."""
    from torchdiag._capture.globalhooks import GlobalHooks

    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    GlobalHooks.traced = False
