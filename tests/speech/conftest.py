import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Speech tests run small ops; on a busy 2-core machine two intra-op threads made them 10x slower
    (measured), so each test runs single-threaded and the setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
