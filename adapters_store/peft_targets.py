"""Which modules of the base a PEFT LoRA config puts an adapter on, and with what rank and scale, by PEFT's own
matching rules (PEFT 0.21.2: tuners_utils.check_target_module_exists, utils.other.get_pattern_key and
lora.LoraLayer.update_layer). PEFT matches against full module names such as "model.layers.0.self_attn.q_proj"."""

import math
import re
from dataclasses import dataclass

from lora_server.adapters_store.base_model import LORA_TARGET_MODULES, BaseModelDescription
from lora_server.adapters_store.peft_config import LoraConfigFields, config_error

# Why 1e4: trained adapters have scales alpha/r (or alpha/sqrt(r)) of about 0.1 to 100, so 1e4 refuses only nonsense,
# and it keeps scale * (B @ A @ x) far from float16's largest value (65504) for weights and activations of ordinary
# magnitude. An unbounded one (lora_alpha 1e308) passed every check and then turned its requests' logits into inf/NaN.
MAX_LORA_SCALE = 1e4


@dataclass(frozen=True)
class TargetSpec:
    rank: int
    scale: float
    rank_field: str  # where the rank came from ("r" or "rank_pattern['q_proj']"), for messages


def resolve_targets(config: LoraConfigFields, base: BaseModelDescription) -> dict[tuple[int, str], TargetSpec]:
    """(layer, module) -> rank and scale, for every module of the base that the config targets."""
    names = base.module_names()
    _check_targets_exist(config, names, base)
    _check_layers_exist(config, base)
    targets = {}
    for name, key in names.items():
        if _is_targeted(config, name):
            targets[key] = _rank_and_scale(config, name)
    if not targets:
        raise config_error("target_modules", f"with exclude_modules, layers_to_transform and layers_pattern, the "
                                             f"config selects no module of {base.describe()}")
    return targets


def _check_targets_exist(config: LoraConfigFields, names: dict[str, tuple[int, str]],
                         base: BaseModelDescription) -> None:
    # PEFT itself only fails when nothing at all matches; a named target we do not have (lm_head, embed_tokens,
    # GPT-2's c_attn) means the adapter was made for something else, so it is refused outright.
    if isinstance(config.target_modules, str):
        if not any(re.fullmatch(config.target_modules, name) for name in names):
            raise config_error("target_modules", f"regular expression {config.target_modules!r} matches no module "
                                                 f"of {base.describe()}")
        return
    for target in config.target_modules:
        if not any(_name_matches(name, target) for name in names):
            raise config_error("target_modules", f"unknown target module {target!r}: not one of "
                                                 f"{', '.join(LORA_TARGET_MODULES)} in {base.describe()}")


def _check_layers_exist(config: LoraConfigFields, base: BaseModelDescription) -> None:
    for layer in config.layers_to_transform or ():
        if not 0 <= layer < base.num_layers:
            raise config_error("layers_to_transform", f"layer {layer} does not exist in {base.describe()}")


def _name_matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def _is_targeted(config: LoraConfigFields, name: str) -> bool:
    """check_target_module_exists, for a LoRA config without modules_to_save or target_parameters."""
    exclude = config.exclude_modules
    if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
            return False
    elif any(_name_matches(name, e) for e in exclude):
        return False

    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, name) is not None
    if name in config.target_modules:
        return True  # a full module name is taken as is: PEFT skips the layer filter for it
    if not any(name.endswith(f".{t}") for t in config.target_modules):
        return False
    if config.layers_to_transform is None:
        return True
    # The layer index is the first number after the layers_pattern segment (or after any segment by default).
    if config.layers_pattern:
        match = None
        for pattern in config.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return match is not None and int(match.group("idx")) in config.layers_to_transform


def _rank_and_scale(config: LoraConfigFields, name: str) -> TargetSpec:
    rank_key = _pattern_key(config.rank_pattern, name)
    alpha_key = _pattern_key(config.alpha_pattern, name)
    rank = config.rank if rank_key is None else config.rank_pattern[rank_key]
    alpha = config.alpha if alpha_key is None else config.alpha_pattern[alpha_key]
    scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank  # rsLoRA: rank-stabilised scaling
    if not abs(scale) <= MAX_LORA_SCALE:  # `not <=`: NaN fails too
        alpha_field = "lora_alpha" if alpha_key is None else f"alpha_pattern[{alpha_key!r}]"
        raise config_error(alpha_field, f"gives {name} a LoRA scale of {scale:.4g}; this server takes scales of at "
                                        f"most {MAX_LORA_SCALE:g} in magnitude")
    return TargetSpec(rank=rank, scale=scale, rank_field="r" if rank_key is None else f"rank_pattern[{rank_key!r}]")


def _pattern_key(patterns: dict[str, object], name: str) -> str | None:
    """get_pattern_key: the first key (in file order) that, as a regex, matches a dot-separated tail of the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None
