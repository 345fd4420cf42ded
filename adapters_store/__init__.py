"""Adapter files and their durable home: PEFT LoRA parsing and validation against a description of the base model,
and the store that keeps validated uploads by content hash with a SQLite registry."""

from lora_server.adapters_store.base_model import (
    ATTENTION_MODULES,
    LORA_TARGET_MODULES,
    MLP_MODULES,
    BaseModelDescription,
    full_module_name,
)
from lora_server.adapters_store.errors import AdapterError
from lora_server.adapters_store.limits import StoreLimits
from lora_server.adapters_store.lora_adapter import LoraAdapter, LoraModuleWeights
from lora_server.adapters_store.peft_adapter import load_peft_adapter, parse_peft_adapter
from lora_server.adapters_store.recovery import RecoveryReport
from lora_server.adapters_store.registry import DELETED, READY, UNUSABLE, AdapterVersion
from lora_server.adapters_store.safetensors_header import check_safetensors_header
from lora_server.adapters_store.store import AdapterStore, base_fingerprint_of
from lora_server.adapters_store.store_errors import AdapterNotFound, AdapterUnusable, StoreLocked

__all__ = [
    "ATTENTION_MODULES", "DELETED", "LORA_TARGET_MODULES", "MLP_MODULES", "READY", "UNUSABLE", "AdapterError",
    "AdapterNotFound", "AdapterStore", "AdapterUnusable", "AdapterVersion", "BaseModelDescription", "LoraAdapter",
    "LoraModuleWeights", "RecoveryReport", "StoreLimits", "StoreLocked", "base_fingerprint_of",
    "check_safetensors_header", "full_module_name", "load_peft_adapter", "parse_peft_adapter",
]
