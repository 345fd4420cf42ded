import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """These tensors are tiny: extra intra-op threads only add overhead, and spin badly on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
