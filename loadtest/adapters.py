"""Adapters for an experiment: N random LoRA adapters of mixed ranks, shaped for whatever model the server runs,
uploaded through the API (POST /v1/adapters, PEFT files).

The server publishes no route with its layer shapes, so they are read from its upload validation, which names them:
an adapter for a layer that cannot exist is refused with "<model> (N layers)", and a tensor of the wrong shape with
"expected (rows, cols)". The probes are refused uploads: nothing is stored (they count as `invalid` uploads in the
server's metrics).
"""

import json
import logging
import re
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save as save_safetensors

from lora_server.loadtest.client import Endpoint, check, error_message
from lora_server.loadtest.errors import LoadtestError

logger = logging.getLogger(__name__)

PROBE_ID = "loadtest-shape-probe"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYERS = re.compile(r"\((\d+) layers\)")
_EXPECTED = re.compile(r"expected \((\d+), (\d+)\)")


@dataclass(frozen=True)
class ModelShapes:
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)


def tensor_key(layer: int, module: str, which: str) -> str:
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"


def peft_files(shapes: ModelShapes, rank: int, seed: int) -> dict[str, bytes]:
    """A PEFT adapter (adapter_config.json, adapter_model.safetensors) with small random float16 weights."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for module, (in_features, out_features) in shapes.module_shapes.items():
            # Small values: a visible but bounded change to the output, like a trained adapter's.
            tensors[tensor_key(layer, module, "A")] = (rng.standard_normal((rank, in_features)) * 0.01).astype(
                np.float16)
            tensors[tensor_key(layer, module, "B")] = (rng.standard_normal((out_features, rank)) * 0.01).astype(
                np.float16)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(shapes.module_shapes),
              "bias": "none", "task_type": "CAUSAL_LM"}
    return {"adapter_config": json.dumps(config).encode(), "adapter_model": save_safetensors(tensors)}


def probe_shapes(endpoint: Endpoint, modules: tuple[str, ...]) -> ModelShapes:
    """The served model's layer count and each module's (in, out) features, from refused uploads."""
    far_layer = 1 << 20
    message = _probe(endpoint, modules[0], {tensor_key(far_layer, modules[0], "A"): np.zeros((1, 1), np.float16)},
                     layers=None)
    (num_layers,) = _parse(_LAYERS, message, "the layer count")
    module_shapes = {}
    for module in modules:
        a_key, b_key = tensor_key(0, module, "A"), tensor_key(0, module, "B")
        tiny = np.zeros((1, 1), np.float16)
        _, in_features = _parse(_EXPECTED, _probe(endpoint, module, {a_key: tiny, b_key: tiny}, [0]),
                                f"{module}'s input")
        wide_a = np.zeros((1, in_features), np.float16)
        out_features, _ = _parse(_EXPECTED, _probe(endpoint, module, {a_key: wide_a, b_key: tiny}, [0]),
                                   f"{module}'s output")
        module_shapes[module] = (in_features, out_features)
    logger.info("the served model: %d layers, module shapes %s", num_layers, module_shapes)
    return ModelShapes(num_layers, module_shapes)


def upload_random_adapters(endpoint: Endpoint, shapes: ModelShapes, num: int, ranks: tuple[int, ...], prefix: str,
                           seed: int) -> list[str]:
    """Adapters `{prefix}-0000` ... in that order (use it as the popularity order), ranks drawn from `ranks`; one that
    exists already (a rerun) is kept as it is."""
    rng = np.random.default_rng(seed)
    ids = []
    for index in range(num):
        adapter_id = f"{prefix}-{index:04d}"
        rank = int(rng.choice(ranks))
        status, body = endpoint.post_multipart("/v1/adapters", {"adapter_id": adapter_id},
                                               peft_files(shapes, rank, seed * 100_003 + index))
        if status != 409:  # 409: it exists from an earlier run
            check(status, body, f"uploading adapter {adapter_id}")
        ids.append(adapter_id)
    return ids


def _probe(endpoint: Endpoint, module: str, tensors: dict[str, np.ndarray], layers: list[int] | None) -> str:
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module], "bias": "none"}
    if layers is not None:
        config["layers_to_transform"] = layers
    files = {"adapter_config": json.dumps(config).encode(), "adapter_model": save_safetensors(tensors)}
    status, body = endpoint.post_multipart("/v1/adapters", {"adapter_id": PROBE_ID}, files)
    if status == 400:
        return error_message(body)
    check(status, body, "probing the model's shapes with a refused upload")
    raise LoadtestError(f"probing the model's shapes: the server accepted a malformed adapter (HTTP {status}); "
                        f"delete {PROBE_ID!r}")


def _parse(pattern: re.Pattern, message: str, what: str) -> tuple[int, ...]:
    match = pattern.search(message)
    if match is None:
        raise LoadtestError(f"could not read {what} from the server's answer to a probe upload: {message}")
    return tuple(int(group) for group in match.groups())
