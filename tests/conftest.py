"""Without a GPU, Triton kernels run under Triton's interpreter (on CPU tensors): TRITON_INTERPRET=1.

Triton reads it when it is imported (its own @triton.jit helpers, tl.zeros among them, are built then), and the
first test module to import triton is not a kernel test: bitsandbytes, behind server.model.nf4 and peft, imports it.
So it is set here, before any test module is collected. With a GPU, kernels compile and run for real.

The `rng` fixture: a fresh seed every run, named in the report of a test that fails, so the failure can be replayed.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-seconds", type=float, default=90.0,
                     help="how long tests/api/test_soak.py runs its mixed load (default: 90)")


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    return request.config.getoption("--soak-seconds")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random.Random with a fresh seed; a failing test's report shows it ("Captured seed")."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.add_report_section("call", "seed", f"rng = random.Random({seed})")
    return random.Random(seed)
