"""Engines for tests: on the demo, or on a random checkpoint (transformers) with random PEFT adapters, every adapter
uploaded through a real store."""

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from lora_server.adapters_store import AdapterStore
from lora_server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from lora_server.engine.build import EngineOptions, LoadedEngine, base_description, open_engine
from tests.reference import TINY_DIMS, add_random_lora, save_random_hf_model

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RANDOM_ADAPTERS = {  # name -> PEFT LoraConfig arguments: mixed ranks, rsLoRA, patterns, partial targets
    "r8": dict(r=8, lora_alpha=16),
    "r2-rslora": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "r16-patterned": dict(r=16, lora_alpha=8, rank_pattern={"o_proj": 4}, target_modules=["o_proj", "up_proj"]),
    "r32": dict(r=32, lora_alpha=32, target_modules=["k_proj", "gate_proj"]),
}
EOS_TOKEN_ID = 2


def put_adapter_dir(store: AdapterStore, name: str, path: Path, tenant: str = "default") -> None:
    store.put(tenant, name, {f: (path / f).read_bytes() for f in ADAPTER_FILES})


def open_demo_engine(store_dir: Path, **options) -> LoadedEngine:
    store = AdapterStore.open(store_dir, base_description(DEMO_MODEL_DIR))
    for name, path in demo_adapter_dirs().items():
        put_adapter_dir(store, name, path)
    return open_engine(DEMO_MODEL_DIR, store, EngineOptions(**options))


def write_random_checkpoint(root: Path, seed: int = 5) -> Path:
    """A random tiny Llama with a word-level tokenizer (token i is "t{i}") and random PEFT adapters beside it."""
    import transformers

    model_dir = root / "base"
    save_random_hf_model(model_dir, "LlamaForCausalLM", seed=seed, tie_word_embeddings=False)
    vocab = {f"t{i}": i for i in range(TINY_DIMS["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{EOS_TOKEN_ID}"}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_TOKEN_ID}))
    for index, (name, kwargs) in enumerate(RANDOM_ADAPTERS.items()):
        add_random_lora(transformers.LlamaForCausalLM.from_pretrained(model_dir), root / name, seed=50 + index,
                        **kwargs)
    return model_dir


def open_random_engine(root: Path, store_dir: Path, **options) -> LoadedEngine:
    model_dir = root / "base"
    store = AdapterStore.open(store_dir, base_description(model_dir))
    for name in RANDOM_ADAPTERS:
        put_adapter_dir(store, name, root / name)
    return open_engine(model_dir, store, EngineOptions(**{"device": "cpu", **options}))
