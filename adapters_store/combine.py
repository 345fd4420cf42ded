"""Combine stored adapters into a new PEFT adapter: Σ w_i·δ_i per module, with δ_i = scale_i·B_i·A_i.

    linear: exact. Ranks are concatenated: A = [A_1; A_2; ...], B = [w_1·s_1·B_1, w_2·s_2·B_2, ...], so B·A = Σ w_i·δ_i.
            A module only some sources target gets only their ranks (no zero padding).
    svd:    the summed delta, truncated to `rank` by SVD; the relative Frobenius error over all modules is reported.

Either way every module of the result has scale exactly 1 (lora_alpha = rank, no rsLoRA), so B and A carry the whole
delta, and the files are what PEFT's save_pretrained writes: `adapter_config.json` + `adapter_model.safetensors`.
"""

import json
import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store.base_model import full_module_name
from lora_server.adapters_store.errors import AdapterError
from lora_server.adapters_store.lora_adapter import LoraAdapter, LoraModuleWeights
from lora_server.adapters_store.peft_adapter import WEIGHTS_FILE
from lora_server.adapters_store.peft_config import CONFIG_FILE
from lora_server.adapters_store.peft_targets import MAX_LORA_SCALE

METHODS = ("linear", "svd")
ModuleKey = tuple[int, str]
# A weight scales a source's delta as a LoRA scale does, so it gets the same bound (see MAX_LORA_SCALE).
MAX_SOURCE_WEIGHT = MAX_LORA_SCALE
# The result's factors carry every weight and scale (its own scale is 1), and the engine may hold them in float16:
# a factor past float16's largest value would be inf there.
MAX_FACTOR = torch.finfo(torch.float16).max


def combine_adapters(sources: Sequence[tuple[LoraAdapter, float]], method: str = "linear",
                     rank: int | None = None) -> tuple[dict[str, bytes], float]:
    """(PEFT files of the combined adapter, relative Frobenius error: 0.0 for linear). Raises AdapterError."""
    _check_request(sources, method, rank)
    keys = sorted({key for adapter, _ in sources for key in adapter.modules})
    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (A [r, in], B [out, r]), scale 1
    error_squared = total_squared = 0.0
    for key in keys:
        terms = [(index, adapter.modules[key], weight) for index, (adapter, weight) in enumerate(sources)
                 if key in adapter.modules]
        a, b = _concatenated(key, terms)
        if method == "svd":
            a, b, discarded, total = _truncated(a, b, rank)
            error_squared, total_squared = error_squared + discarded, total_squared + total
            _check_factors(key, a, b, "sources", "the truncated factors")
        modules[key] = (a.float().contiguous(), b.float().contiguous())
    relative_error = math.sqrt(error_squared / total_squared) if total_squared > 0 else 0.0
    base_model = sources[0][0].config.get("base_model_name_or_path")
    return {CONFIG_FILE: _config_bytes(modules, base_model), WEIGHTS_FILE: _weights_bytes(modules)}, relative_error


def _check_request(sources: Sequence[tuple[LoraAdapter, float]], method: str, rank: int | None) -> None:
    if method not in METHODS:
        raise AdapterError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if not sources:
        raise AdapterError("sources", "name at least one adapter to combine")
    for index, (_, weight) in enumerate(sources):
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise AdapterError(f"sources[{index}].weight", f"must be a finite number, got {weight!r}")
        if abs(weight) > MAX_SOURCE_WEIGHT:
            raise AdapterError(f"sources[{index}].weight", f"must be at most {MAX_SOURCE_WEIGHT:g} in magnitude, "
                                                           f"got {weight!r}")
    if method == "svd":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise AdapterError("rank", f"svd needs a positive integer rank, got {rank!r}")
    elif rank is not None:
        raise AdapterError("rank", "only the svd method takes a rank (linear keeps the sum of the sources' ranks)")


# ---------------------------------------------------------------------------------------------------- the math


def _concatenated(key: ModuleKey, terms: list[tuple[int, LoraModuleWeights, float]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [Σr, in], B [out, Σr]) in fp64 with B·A = Σ w·scale·B_i·A_i: each weight and scale folded into B_i.
    `terms` are (source index, module, weight); AdapterError naming the source whose factors would not fit."""
    a_parts, b_parts = [], []
    for index, module, weight in terms:
        a_i, b_i = module.lora_a.double(), module.lora_b.double() * (weight * module.scale)
        _check_factors(key, a_i, b_i, f"sources[{index}].weight", "weight × scale × lora_B")
        a_parts.append(a_i)
        b_parts.append(b_i)
    return torch.cat(a_parts), torch.cat(b_parts, dim=1)


def _check_factors(key: ModuleKey, a: torch.Tensor, b: torch.Tensor, field: str, what: str) -> None:
    largest = max(a.abs().max().item(), b.abs().max().item())
    if not largest <= MAX_FACTOR:  # `not <=`: NaN fails too
        raise AdapterError(field, f"{what} of {full_module_name(*key)} reach {largest:.4g}, past float16's "
                                  f"largest value {MAX_FACTOR:g}")


def _truncated(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-`rank` factors of D = B·A, and (‖D − D_k‖², ‖D‖²) in the Frobenius norm.

    D has rank ≤ Σr, so its SVD comes from QR factors of the thin B and Aᵀ and the SVD of a small Σr × Σr core:
    B = Q_b R_b, Aᵀ = Q_a R_a, D = Q_b (R_b R_aᵀ) Q_aᵀ. Exact, and it never builds the dense [out, in] D."""
    q_b, r_b = torch.linalg.qr(b)  # q_b [out, Σr], r_b [Σr, Σr]
    q_a, r_a = torch.linalg.qr(a.T)  # q_a [in, Σr]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # s [Σr], descending
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()  # split each singular value evenly between B and A: similar magnitudes, as trained LoRAs have
    b_k = (q_b @ u[:, :k]) * root  # [out, k]
    a_k = root[:, None] * (vh[:k] @ q_a.T)  # [k, in]
    squared = s.square()
    return a_k, b_k, float(squared[k:].sum()), float(squared.sum())


# ---------------------------------------------------------------------------------------------------- PEFT files


def _config_bytes(modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]], base_model: str | None) -> bytes:
    """Full module names as targets (PEFT takes a full name as is), r the most common rank, and a rank_pattern and
    alpha_pattern entry for each module of another rank. lora_alpha = rank everywhere: every scale is exactly 1."""
    ranks = {key: a.shape[0] for key, (a, _) in modules.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    # Patterns are regular expressions matched against a tail of the module name: escape the dots of full names.
    others = {re.escape(full_module_name(*key)): rank for key, rank in ranks.items() if rank != common}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": common,
        "lora_alpha": common,
        "use_rslora": False,
        "target_modules": [full_module_name(*key) for key in modules],
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return json.dumps(config, indent=2).encode()


def _weights_bytes(modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    tensors = {}
    for key, (a, b) in modules.items():
        prefix = f"base_model.model.{full_module_name(*key)}"
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
    return save_safetensors(tensors, metadata={"format": "pt"})
