"""The NF4 pass: swap every LoRA linear's dense base for a bitsandbytes 4-bit one (NF4, double quantization,
block size 64). Embeddings, norms and the LM head stay in the compute dtype, and the LoRA term never sees 4 bits:
it is added by `LoraLinear` on top of whatever `base` returns."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn

from lora_server.model.lora_linear import DenseBase, LoraLinear

NF4_BLOCK_SIZE = 64


class Nf4Base(nn.Module):
    def __init__(self, dense: DenseBase) -> None:
        super().__init__()
        weight = dense.weight.data  # [out, in] in the compute dtype
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype
        packed, self.quant_state = bnb_functional.quantize_4bit(
            weight, blocksize=NF4_BLOCK_SIZE, compress_statistics=True, quant_type="nf4"
        )
        self.register_buffer("packed_weight", packed)  # uint8 [out * in / 2, 1]: two 4-bit codes per byte
        self.bias = dense.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in] -> [num_tokens, out]; bitsandbytes dequantizes block-wise inside the matmul.
        return bnb.matmul_4bit(x, self.packed_weight.t(), quant_state=self.quant_state, bias=self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer effectively multiplies by, [out, in] in the compute dtype (the test oracle)."""
        return bnb_functional.dequantize_4bit(self.packed_weight, self.quant_state).to(self.compute_dtype)

    @property
    def weight_bytes(self) -> int:
        """Packed codes plus the (double-quantized) absmax statistics."""
        state = self.quant_state
        statistics = state.absmax.numel() * state.absmax.element_size()
        if state.nested and state.state2 is not None:
            statistics += state.state2.absmax.numel() * state.state2.absmax.element_size()
            statistics += state.state2.code.numel() * state.state2.code.element_size()
        return self.packed_weight.numel() * self.packed_weight.element_size() + statistics


def quantize_nf4_(model: nn.Module) -> tuple[int, int]:
    """Quantize every LoraLinear base in place. Returns (dense bytes before, NF4 bytes after) of those layers."""
    dense_bytes = nf4_bytes = 0
    for linear in [m for m in model.modules() if isinstance(m, LoraLinear)]:
        assert isinstance(linear.base, DenseBase), "quantize_nf4_ runs once, on a dense model"
        dense_bytes += linear.base.weight_bytes
        linear.base = Nf4Base(linear.base)  # the dense weight is released with the old module
        nf4_bytes += linear.base.weight_bytes
    return dense_bytes, nf4_bytes
