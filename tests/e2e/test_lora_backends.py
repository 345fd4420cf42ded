"""The Triton kernels (interpreted on CPU, compiled on a GPU) and the plain-torch path generate the same greedy
tokens on the demo, with every adapter and the base mixed in one batch."""

import torch

from adapters_store import load_peft_adapter
from kernels.lora_ops import resolve_lora_backend
from server.demo import tasks
from server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from server.engine.base_description import describe_base_model
from server.engine.offline import GenerationRequest, generate
from server.engine.sampler import SamplingParams
from server.model.loader import load_model
from server.model.tokenizer import load_tokenizer


def test_triton_and_torch_backends_generate_the_same_tokens():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(DEMO_MODEL_DIR, device, torch.float32)
    tokenizer = load_tokenizer(DEMO_MODEL_DIR, model.config.eos_token_ids)
    adapters = {name: load_peft_adapter(path, describe_base_model(model.config))
                for name, path in demo_adapter_dirs().items()}
    texts = tasks.held_out_texts(2, seed=99)
    requests = [GenerationRequest(tokenizer.encode(tasks.make_prompt(text)), adapter, SamplingParams(max_new_tokens=8))
                for text in texts for adapter in (None, *adapters)]
    outputs = {}
    for backend in ("torch", "triton"):
        model.set_lora_backend(resolve_lora_backend(backend, device))
        outputs[backend] = [r.token_ids for r in generate(model, requests, adapters, tokenizer.eos_token_ids)]
    assert outputs["triton"] == outputs["torch"]
    assert len({tuple(tokens) for tokens in outputs["torch"]}) == len(requests)  # every adapter visibly differs
