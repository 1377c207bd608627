"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny models: one intra-op thread is several times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
