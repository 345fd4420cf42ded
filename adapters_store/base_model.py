"""What an adapter is checked against: the base model's LoRA-capable modules and their sizes, as plain data (this
package never imports the server)."""

from dataclasses import dataclass

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES


def full_module_name(layer: int, module: str) -> str:
    """The module's name inside a Hugging Face *ForCausalLM, which is what PEFT matches its patterns against."""
    assert module in LORA_TARGET_MODULES, module
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


@dataclass(frozen=True)
class BaseModelDescription:
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features), for all seven modules
    name: str = ""  # only for messages

    def __post_init__(self) -> None:
        # Built by the server from its own model config, never from user input: a mistake here is a bug.
        assert self.num_layers > 0, self.num_layers
        assert set(self.module_shapes) == set(LORA_TARGET_MODULES), sorted(self.module_shapes)
        assert all(len(s) == 2 and min(s) > 0 for s in self.module_shapes.values()), self.module_shapes

    def module_names(self) -> dict[str, tuple[int, str]]:
        """Full module name -> (layer, module), for every LoRA-capable module of the base, in layer order."""
        return {full_module_name(layer, module): (layer, module)
                for layer in range(self.num_layers) for module in LORA_TARGET_MODULES}

    def describe(self) -> str:
        return f"{self.name or 'the base model'} ({self.num_layers} layers)"
