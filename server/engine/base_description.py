"""Describe the loaded base model as plain data, which is all adapters_store may know about it."""

from adapters_store import BaseModelDescription
from server.model.config import ModelConfig


def describe_base_model(config: ModelConfig, name: str = "") -> BaseModelDescription:
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {  # module -> (in_features, out_features)
        "q_proj": (hidden, config.q_size),
        "k_proj": (hidden, config.kv_size),
        "v_proj": (hidden, config.kv_size),
        "o_proj": (config.q_size, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    return BaseModelDescription(num_layers=config.num_layers, module_shapes=shapes, name=name)
