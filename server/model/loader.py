"""Build a model from a local Hugging Face checkpoint directory: meta-device modules, weights streamed from
safetensors straight into them (single file or sharded with an index)."""

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from lora_server.model.config import ModelConfig, ModelConfigError
from lora_server.model.llama import PACKED_MODULES, LlamaModel

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)")
_NORM_KEY = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and lossy; fp32 is the fast path there
    return _DTYPES.get(checkpoint_dtype, torch.bfloat16) if checkpoint_dtype != "float32" else torch.bfloat16


def read_config(model_dir: Path) -> ModelConfig:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelConfigError(f"{model_dir} has no config.json")
    return ModelConfig.from_hf(json.loads(config_path.read_text()))


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    with torch.device("meta"):
        model = LlamaModel(config).to(dtype)
    model.to_empty(device=device)  # allocates storage without initialising it; every tensor is filled below
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty gives each module its own tensor: re-tie
    for layer in model.layers:
        layer.self_attn.rotary.reset_parameters()

    unfilled = _parameter_names(model)
    files = _checkpoint_files(model_dir)
    # disable=None: a bar on a terminal, nothing in a log file. Counted in tensors, so one big shard moves too.
    bar = tqdm(total=sum(len(names or ()) for names in files.values()), desc=f"loading {model_dir.name}",
               unit="tensor", disable=None)
    for path, names in files.items():
        with safe_open(path, framework="pt", device="cpu") as checkpoint:
            names = names if names is not None else list(checkpoint.keys())
            if path.name == SINGLE_FILE:
                bar.total = len(names)
            for name in names:
                bar.update()
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # older checkpoints save this buffer; we compute it
                target = _target_for(model, name)
                if target is None:
                    raise ModelConfigError(f"checkpoint tensor {name!r} has no place in a {config.architecture} model")
                tensor = checkpoint.get_tensor(name)
                if tensor.shape != target.shape:
                    raise ModelConfigError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                           f"expected {tuple(target.shape)}")
                target.copy_(tensor)
                unfilled.discard(_parameter_name(name))
    bar.close()
    if unfilled:
        raise ModelConfigError(f"checkpoint lacks tensors for: {', '.join(sorted(unfilled)[:8])}")
    logger.info("loaded %s (%d layers) from %s on %s as %s", config.architecture, config.num_layers, model_dir,
                device, dtype)
    return model


def _checkpoint_files(model_dir: Path) -> dict[Path, list[str] | None]:
    """safetensors file -> the tensor names to read from it (None: all of them)."""
    if (model_dir / INDEX_FILE).is_file():
        weight_map: dict[str, str] = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        files: dict[Path, list[str] | None] = {}
        for name, file_name in weight_map.items():
            files.setdefault(model_dir / file_name, []).append(name)
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return {model_dir / SINGLE_FILE: None}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelConfigError(f"{model_dir} holds only pickle weights (.bin/.pt); convert them to safetensors")
    raise ModelConfigError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _parameter_name(hf_name: str) -> str:
    """The checkpoint name a parameter is filled from, folding packed slices onto their packed parameter."""
    match = _LAYER_KEY.fullmatch(hf_name)
    if match and match.group(3) in PACKED_MODULES:
        layer, _, module, kind = match.groups()
        packed, k = PACKED_MODULES[module]
        return f"layers.{layer}.{packed}.{kind}.{k}"
    return hf_name


def _parameter_names(model: LlamaModel) -> set[str]:
    """Every checkpoint-derived name that must be filled (packed parameters once per slice)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not model.config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i, layer in enumerate(model.layers):
        names |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
        for packed, k in PACKED_MODULES.values():
            linear = model.packed_linear(layer, packed)
            names.add(f"layers.{i}.{packed}.weight.{k}")
            if linear.base.bias is not None:
                names.add(f"layers.{i}.{packed}.bias.{k}")
    return names


def _target_for(model: LlamaModel, name: str) -> torch.Tensor | None:
    """The tensor (or packed slice view) that checkpoint tensor `name` fills, or None if it has no place."""
    if name == "model.embed_tokens.weight":
        return model.embed_tokens.weight
    if name == "model.norm.weight":
        return model.norm.weight
    if name == "lm_head.weight":
        return model.lm_head.weight
    if match := _NORM_KEY.fullmatch(name):
        layer = int(match.group(1))
        return getattr(model.layers[layer], match.group(2)).weight if layer < len(model.layers) else None
    match = _LAYER_KEY.fullmatch(name)
    if not match or match.group(3) not in PACKED_MODULES or int(match.group(1)) >= len(model.layers):
        return None
    layer, _, module, kind = match.groups()
    packed, k = PACKED_MODULES[module]
    linear = model.packed_linear(model.layers[int(layer)], packed)
    tensor = getattr(linear.base, kind)
    if tensor is None:
        return None
    lo, hi = linear.slice_offsets[k], linear.slice_offsets[k + 1]
    return tensor[lo:hi]  # a view: copy_ writes the slice of the packed parameter in place
