"""Read a PEFT `adapter_config.json` into the few fields that decide the math, and refuse every setting that would
change the math in a way this server does not implement. The rules follow PEFT 0.21.2's LoraConfig and LoraLayer."""

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_server.adapters_store.base_model import LORA_TARGET_MODULES
from lora_server.adapters_store.errors import AdapterError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"

# Settings that change the math whenever truthy. PEFT tests them with bool(value) and writes every one of them to
# the file (null, false or [] when off), so only a truthy value is refused.
_REFUSED_WHEN_TRUTHY = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save is not supported (it replaces whole base modules with trained copies)",
    "use_qalora": "QALoRA adapters are not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens are not supported",
    "layer_replication": "layer replication is not supported",
}
# LoRA variants switched on by a sub-config: PEFT turns any non-null value, even {}, into a config object.
# velora_config is not here: VeLoRA only replaces the backward pass, and in eval its forward is plain LoRA.
_REFUSED_WHEN_PRESENT = {
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA adapters are not supported",
}
# These initialisations subtract B0 @ A0 from the *base* weights (LoftQ replaces them with quantised ones), so the
# adapter only fits that modified base. Other inits (true, false, gaussian, eva, orthogonal, mica) leave it alone.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraConfigFields:
    raw: dict[str, Any]
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str  # module names, or one regex matched against the full module name
    exclude_modules: tuple[str, ...] | str
    layers_to_transform: tuple[int, ...] | None  # None: every layer
    layers_pattern: tuple[str, ...]
    rank_pattern: dict[str, int]  # pattern -> rank, in file order (the first match wins)
    alpha_pattern: dict[str, float]
    is_velora: bool  # VeLoRA writes a training-only `lora_velora_embed` tensor per module


def config_error(field: str, message: str) -> AdapterError:
    return AdapterError(field, message, file=CONFIG_FILE)


def parse_lora_config(config_bytes: bytes) -> LoraConfigFields:
    try:
        raw = json.loads(config_bytes)
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, 5000-digit ints, [[[[...]]]] nesting
        raise AdapterError(CONFIG_FILE, f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise AdapterError(CONFIG_FILE, f"must be a JSON object, got {type(raw).__name__}")
    _refuse_unsupported(raw)
    # fan_in_fan_out is ignored on purpose: it only says the *base* weight is stored [in, out] (GPT-2's Conv1D).
    # lora_A and lora_B are always nn.Linear ([r, in] and [out, r]), and on nn.Linear bases (every Llama-family
    # model) PEFT resets fan_in_fan_out to False with a warning, so the tensors mean the same either way.
    if raw.get("fan_in_fan_out"):
        logger.info("%s: fan_in_fan_out=true is ignored, as PEFT does on nn.Linear modules", CONFIG_FILE)

    target_modules = _target_modules(raw.get("target_modules"))
    layers_to_transform = _layers_to_transform(raw.get("layers_to_transform"))
    layers_pattern = _string_or_list(raw.get("layers_pattern"), "layers_pattern")
    # PEFT's LoraConfig.__post_init__ raises on these combinations.
    if isinstance(target_modules, str) and (layers_to_transform is not None or layers_pattern):
        field = "layers_to_transform" if layers_to_transform is not None else "layers_pattern"
        raise config_error(field, "cannot be used when target_modules is a regular expression")
    if layers_pattern and layers_to_transform is None:
        raise config_error("layers_pattern", "needs layers_to_transform")
    for pattern in layers_pattern:
        _compile(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", "layers_pattern")

    use_rslora = raw.get("use_rslora") or False
    if not isinstance(use_rslora, bool):
        raise config_error("use_rslora", f"must be true or false, got {use_rslora!r}")
    return LoraConfigFields(
        raw=raw,
        rank=_positive_int(raw.get("r", 8), "r"),  # PEFT's defaults for a missing r / lora_alpha
        alpha=_finite_number(raw.get("lora_alpha", 8), "lora_alpha"),
        use_rslora=use_rslora,
        target_modules=target_modules,
        exclude_modules=_exclude_modules(raw.get("exclude_modules")),
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        rank_pattern=_pattern(raw.get("rank_pattern"), "rank_pattern", _positive_int),
        alpha_pattern=_pattern(raw.get("alpha_pattern"), "alpha_pattern", _finite_number),
        is_velora=raw.get("velora_config") is not None,
    )


def _refuse_unsupported(raw: dict[str, Any]) -> None:
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise config_error("peft_type", f"only LORA adapters are supported, got {peft_type!r}")
    for field, message in _REFUSED_WHEN_TRUTHY.items():
        if raw.get(field):
            raise config_error(field, message)
    for field, message in _REFUSED_WHEN_PRESENT.items():
        if raw.get(field) is not None:
            raise config_error(field, message)
    bias = raw.get("bias", "none")
    if bias != "none":
        raise config_error("bias", f"only 'none' is supported (trained base biases are not), got {bias!r}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise config_error("init_lora_weights", f"{init!r} adapters only fit a modified base model; convert them "
                           "to plain LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))")


def _target_modules(value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str):
        if value.lower() == "all-linear":  # PEFT expands this (case-insensitively) to every linear but the head
            return LORA_TARGET_MODULES
        _compile(value, "target_modules")
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise config_error("target_modules", f"must be a non-empty list of module names, a regular expression or "
                                             f"'all-linear', got {value!r}")
    return tuple(value)


def _exclude_modules(value: Any) -> tuple[str, ...] | str:
    if value is None:
        return ()
    if isinstance(value, str):
        _compile(value, "exclude_modules")
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise config_error("exclude_modules", f"must be a list of module names or a regular expression, got {value!r}")
    return tuple(value)


def _layers_to_transform(value: Any) -> tuple[int, ...] | None:
    if value is None or value == []:  # PEFT: an empty list means every layer
        return None
    layers = [value] if isinstance(value, int) else value
    if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise config_error("layers_to_transform", f"must be an integer or a list of integers, got {value!r}")
    return tuple(layers)


def _string_or_list(value: Any, field: str) -> tuple[str, ...]:
    if value is None or value in ("", []):
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise config_error(field, f"must be a string or a list of strings, got {value!r}")
    return tuple(values)


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise config_error(field, f"must be a positive integer, got {value!r}")
    return value


def _finite_number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise config_error(field, f"must be a finite number, got {value!r}")
    return float(value)


def _pattern(value: Any, field: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise config_error(field, f"must be an object mapping module patterns to values, got {value!r}")
    for key in value:
        _compile(rf"(.*\.)?({key})$", f"{field}[{key!r}]")
    return {key: check(v, f"{field}[{key!r}]") for key, v in value.items()}


def _compile(pattern: str, field: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise config_error(field, f"not a valid regular expression ({error})") from None
