"""Adapter files and their durable home: PEFT LoRA parsing and validation against a description of the base model."""

from adapters_store.base_model import (
    ATTENTION_MODULES,
    LORA_TARGET_MODULES,
    MLP_MODULES,
    BaseModelDescription,
    full_module_name,
)
from adapters_store.errors import AdapterError
from adapters_store.lora_adapter import LoraAdapter, LoraModuleWeights
from adapters_store.peft_adapter import load_peft_adapter, parse_peft_adapter

__all__ = [
    "ATTENTION_MODULES", "LORA_TARGET_MODULES", "MLP_MODULES", "AdapterError", "BaseModelDescription", "LoraAdapter",
    "LoraModuleWeights", "full_module_name", "load_peft_adapter", "parse_peft_adapter",
]
