import pytest

from tests.reference import one_torch_thread


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield
