"""The peer row of the engine benchmark: HF transformers + PEFT generating the same requests, mixed adapters per batch.

PEFT serves several adapters in one batch through `generate(..., adapter_names=[...])`, each row its own adapter
("__base__" for none). Its batches are static: requests are taken in order, `batch_size` at a time, left-padded to
the batch's longest prompt, and the batch decodes until its longest output is done. Only each request's own new
tokens are counted, so the padding and the decoding past a request's end are the cost of static batching, as a
user of PEFT would pay it. Imported only when transformers and peft are installed (the test extra).
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PEFT_BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class PeerRequest:
    prompt_token_ids: list[int]
    adapter: str | None  # a directory name in `adapter_dirs`, or None for the base model
    max_new_tokens: int


def peft_tokens_per_second(model_dir: Path, adapter_dirs: dict[str, Path], requests: Sequence[PeerRequest],
                           batch_size: int = 16, pad_token_id: int = 0, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> float:
    """Generated tokens per second (each request's own max_new_tokens, greedy, no early stop), after a warm-up batch,
    on `device` in `dtype` (the engine's, so that both run on the same hardware and precision)."""
    import transformers
    from peft import PeftModel

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    used = sorted({r.adapter for r in requests if r.adapter is not None})
    assert used, "the peer row is for LoRA workloads"
    model = PeftModel.from_pretrained(model, adapter_dirs[used[0]], adapter_name=used[0])
    for name in used[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval().to(device)

    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    _generate(model, batches[0][:2], pad_token_id)  # warm-up: allocator, first-call paths
    _synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        _generate(model, batch, pad_token_id)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return sum(r.max_new_tokens for r in requests) / seconds


@torch.inference_mode()
def _generate(model, batch: Sequence[PeerRequest], pad_token_id: int) -> None:
    longest = max(len(r.prompt_token_ids) for r in batch)
    # Left padding, as decoder-only generation needs: every row's next token comes from its last column.
    device = model.device
    ids = torch.tensor([[pad_token_id] * (longest - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch],
                       device=device)
    mask = torch.tensor([[0] * (longest - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in batch],
                        device=device)
    new_tokens = max(r.max_new_tokens for r in batch)
    model.generate(input_ids=ids, attention_mask=mask, adapter_names=[r.adapter or PEFT_BASE_ADAPTER for r in batch],
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
