"""Where the Triton kernel tests run: the GPU when there is one, else CPU under Triton's interpreter.

TRITON_INTERPRET=1 is set by tests/conftest.py (it must be set before anything imports triton).
"""

import pytest
import torch
import triton


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    from lora_server.kernels.lora_expand import _lora_expand_kernel
    from lora_server.kernels.lora_shrink import _lora_shrink_kernel

    # tl.zeros is one of triton's own jit functions, built when triton was imported.
    for jitted in (triton.language.zeros, _lora_shrink_kernel, _lora_expand_kernel):
        assert not isinstance(jitted, triton.runtime.JITFunction), (
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels compile for a GPU there is none "
            "of: set it before the first import of triton (tests/conftest.py does)"
        )
    return torch.device("cpu")
