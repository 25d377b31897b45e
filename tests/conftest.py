import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    # Guard: a test module that switches autograd off globally (torch.set_grad_enabled(False)
    # at import time) breaks unrelated tests depending on collection order; fail loudly instead.
    assert torch.is_grad_enabled(), "autograd was disabled globally by an imported test module; use torch.no_grad()"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
