"""Without a GPU, Triton kernels run under Triton's interpreter (on CPU tensors): TRITON_INTERPRET=1.

Triton reads it when it is imported (its own @triton.jit helpers, tl.zeros among them, are built then), and the
first test module to import triton is not a kernel test: bitsandbytes, behind server.model.nf4 and peft, imports it.
So it is set here, before any test module is collected. With a GPU, kernels compile and run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
