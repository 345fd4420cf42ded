"""Read a PEFT `adapter_config.json` and answer, with PEFT's own matching rules, which modules it targets and with
what rank and scale. Anything that would change the math in a way we do not implement is refused here."""

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from adapters_store.base_model import LORA_TARGET_MODULES, BaseModelDescription
from adapters_store.errors import AdapterError

CONFIG_FILE = "adapter_config.json"

# Fields that change the adapter's math when set to anything but their default (None, False, empty).
_UNSUPPORTED_WHEN_SET = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "use_qalora": "QALoRA is not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "target_parameters": "targeting parameters (not modules) is not supported",
    "trainable_token_indices": "trainable tokens are not supported",
    "layer_replication": "layer replication is not supported",
    "use_bdlora": "BD-LoRA is not supported",
}


@dataclass(frozen=True)
class LoraConfigSpec:
    raw: dict[str, Any]
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str] | str
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def targets(self, name: str, layer: int) -> bool:
        """Whether PEFT puts a LoRA on module `name` (a full module name such as model.layers.0.mlp.up_proj)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, name):
                    return False
            elif any(name == m or name.endswith(f".{m}") for m in self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None  # PEFT: layers_to_transform ignored here
        if not (name in self.target_modules or any(name.endswith(f".{t}") for t in self.target_modules)):
            return False
        return self.layers_to_transform is None or layer in self.layers_to_transform

    def rank_and_scale(self, name: str) -> tuple[int, float]:
        """PEFT's rule: the first rank_pattern / alpha_pattern key matching the end of the name wins."""
        rank = self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.rank)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.alpha)
        return rank, (alpha / math.sqrt(rank) if self.use_rslora else alpha / rank)


def _pattern_key(patterns: dict[str, Any], name: str) -> str:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def parse_lora_config(config_bytes: bytes, base: BaseModelDescription) -> LoraConfigSpec:
    try:
        raw = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(CONFIG_FILE, f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise AdapterError(CONFIG_FILE, "must be a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError("peft_type", f"only LORA adapters are supported, got {peft_type!r}")
    for field, message in _UNSUPPORTED_WHEN_SET.items():
        if raw.get(field) not in (None, False, [], {}, ""):
            raise AdapterError(field, message)
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterError("bias", f"only bias 'none' is supported, got {bias!r}")
    # fan_in_fan_out only transposes the *base* weight for Conv1D models; on nn.Linear bases (every Llama-family
    # model) PEFT itself resets it to False, so the A and B tensors mean the same either way.
    rank = _positive_int(raw.get("r"), "r")
    alpha = _number(raw.get("lora_alpha", 8), "lora_alpha")
    rank_pattern = _pattern(raw, "rank_pattern", lambda v, f: _positive_int(v, f))
    alpha_pattern = _pattern(raw, "alpha_pattern", _number)
    return LoraConfigSpec(
        raw=raw, rank=rank, alpha=alpha, use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_target_modules(raw.get("target_modules"), base),
        exclude_modules=raw.get("exclude_modules") or None,
        layers_to_transform=_layers(raw.get("layers_to_transform"), base),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
    )


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(field, f"must be a positive integer, got {value!r}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(field, f"must be a finite number, got {value!r}")
    return float(value)


def _pattern(raw: dict[str, Any], field: str, check) -> dict:
    pattern = raw.get(field) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(field, "must be an object mapping module patterns to values")
    return {key: check(value, f"{field}.{key}") for key, value in pattern.items()}


def _target_modules(value: Any, base: BaseModelDescription) -> list[str] | str:
    if value == "all-linear":
        return list(LORA_TARGET_MODULES)
    if isinstance(value, str):
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise AdapterError("target_modules", f"not a valid regular expression ({error})") from None
        if not any(pattern.fullmatch(name) for name in base.module_names()):
            raise AdapterError("target_modules", f"regular expression {value!r} matches no module of the base model")
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AdapterError("target_modules", f"must be a list of module names, a regex or 'all-linear', got {value!r}")
    names = list(base.module_names())
    for target in value:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise AdapterError("target_modules", f"unknown target module {target!r} "
                                                 f"(LoRA is supported on {', '.join(LORA_TARGET_MODULES)})")
    return value


def _layers(value: Any, base: BaseModelDescription) -> list[int] | None:
    if value is None or value == []:
        return None
    layers = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise AdapterError("layers_to_transform", f"must be an integer or a list of integers, got {value!r}")
    for layer in layers:
        if not 0 <= layer < base.num_layers:
            raise AdapterError("layers_to_transform", f"layer {layer} does not exist (the base has "
                                                      f"{base.num_layers} layers)")
    return layers
