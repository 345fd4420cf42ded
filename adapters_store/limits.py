"""How big an adapter this server accepts: one frozen config, and the checks that need only the parsed config."""

from dataclasses import dataclass, fields

from lora_server.adapters_store.base_model import full_module_name
from lora_server.adapters_store.peft_config import config_error
from lora_server.adapters_store.peft_targets import TargetSpec
from lora_server.adapters_store.safetensors_header import DEFAULT_MAX_HEADER_BYTES

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class StoreLimits:
    max_rank: int = 256  # the engine sizes its adapter slots for this rank
    max_file_bytes: int = 512 * MiB  # adapter_model.safetensors
    max_config_bytes: int = 64 * KiB  # adapter_config.json
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # the safetensors header inside the weights file

    def __post_init__(self) -> None:
        # Set by the operator (flags, config files), so a bad value is a clear error rather than an assert.
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"StoreLimits.{field.name} must be a positive integer, got {value!r}")


def check_ranks(targets: dict[tuple[int, str], TargetSpec], limits: StoreLimits) -> None:
    """Refuse a rank over the limit from the config alone, before any tensor is loaded (the tensors must match the
    config's ranks, so none can be larger). Names the config field and the first module, in layer order."""
    for (layer, module), target in sorted(targets.items()):
        if target.rank > limits.max_rank:
            raise config_error(target.rank_field, f"rank {target.rank} of {full_module_name(layer, module)} is over "
                                                  f"this server's maximum of {limits.max_rank}")
