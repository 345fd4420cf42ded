"""The base model's shape and options, read from a Hugging Face `config.json`."""

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# The LoRA targets by their Hugging Face / PEFT names, and where each lives in our packed projections:
# name -> (packed projection, slice). server/'s one list of them; adapters_store.LORA_TARGET_MODULES is the store's
# (it may not import the server), and BaseModelDescription asserts that the two agree.
PACKED_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


class ModelConfigError(ValueError):
    """The checkpoint asks for something this server does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope type {self.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.factor <= 0 or self.theta <= 0:
            raise ModelConfigError(f"rope factor and theta must be positive, got {self.factor} and {self.theta}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # keys further back than this many positions are not attended
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    checkpoint_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_attention_heads {self.num_heads} is not a multiple of "
                                   f"num_key_value_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        architectures = hf.get("architectures") or []
        if len(architectures) != 1:
            raise ModelConfigError(f"config.json must name exactly one architecture, got {architectures!r}")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"architecture {architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no o bias; Llama's attention_bias covers all four.
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=_sliding_window_from_hf(hf, architecture),
            eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
            bos_token_id=hf.get("bos_token_id"),
            checkpoint_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )


def lora_target_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every LoRA target, the same in every layer: what the store validates
    adapters against (the base description) and what the slot writer checks them by."""
    hidden, inter, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    packed = {  # packed projection -> (in_features, out_features of each slice), as server.model.llama builds them
        "qkv_proj": (hidden, (q, kv, kv)),
        "o_proj": (q, (hidden,)),
        "gate_up_proj": (hidden, (inter, inter)),
        "down_proj": (inter, (hidden,)),
    }
    return {name: (packed[projection][0], packed[projection][1][k])
            for name, (projection, k) in PACKED_MODULES.items()}


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files write `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(params["low_freq_factor"])
        kwargs["high_freq_factor"] = float(params["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


def _sliding_window_from_hf(hf: dict[str, Any], architecture: str) -> int | None:
    window = hf.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        return None  # Qwen2 configs carry a window value but only use it when use_sliding_window is set
    num_layers = hf["num_hidden_layers"]
    if architecture == "Qwen2ForCausalLM" and hf.get("max_window_layers", num_layers) < num_layers:
        raise ModelConfigError("Qwen2 sliding window on only some layers (max_window_layers) is not supported")
    return int(window) if window else None
