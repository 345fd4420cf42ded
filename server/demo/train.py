"""Train the embedded demo: a tiny Llama that copies text, then LoRA adapters that transform it.

Reproduce the committed files (about 20-25 minutes on 2 idle CPU cores) with the test extra installed:

    python -m lora_server.demo.train --out server/demo

The base model learns ``"<text> => "`` -> ``text</s>``; each adapter is trained with the base frozen on its own
transformation from ``server.demo.tasks``. transformers and PEFT do the training so that the files are, by
construction, a Hugging Face checkpoint and PEFT adapters; they are test-only dependencies, never needed to serve.
"""

import argparse
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, processors

from lora_server.demo import tasks

logger = logging.getLogger(__name__)

SEED = 20261122
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'] }} => {% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    rank: int
    alpha: int
    use_rslora: bool
    steps: int
    lr: float = 1e-2


ADAPTER_RECIPES = (
    AdapterRecipe("upper", rank=4, alpha=8, use_rslora=False, steps=600),
    # rsLoRA scales by alpha/sqrt(r) = 5.7 instead of alpha/r = 2: at 1e-2 its updates overshoot and it stalls.
    AdapterRecipe("rot13", rank=8, alpha=16, use_rslora=True, steps=700, lr=3e-3),
    AdapterRecipe("title", rank=8, alpha=16, use_rslora=False, steps=700),
    AdapterRecipe("reverse", rank=16, alpha=32, use_rslora=False, steps=2000),
)


def build_tokenizer() -> Tokenizer:
    """Character-level: one token per printable ASCII character, plus pad/BOS/EOS; BOS added on encode."""
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    # A BPE with no merges is a character tokenizer; Fuse joins the characters back without separators.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([PAD, BOS, EOS])
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return tokenizer


def make_batch(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt text, target text) pairs -> input ids, attention mask, labels (loss only on target + EOS)."""
    rows, label_rows = [], []
    for text, target in pairs:
        prompt_ids = tokenizer.encode(tasks.make_prompt(text)).ids
        target_ids = tokenizer.encode(target, add_special_tokens=False).ids + [tokenizer.token_to_id(EOS)]
        rows.append(prompt_ids + target_ids)
        label_rows.append([-100] * len(prompt_ids) + target_ids)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(label_row)
    return ids, mask, labels


def mixed_case(text: str, rng: random.Random) -> str:
    """Half the base's training texts get random letters upper-cased.

    Why: with only lowercase inputs, the uppercase embeddings (tied to the LM head) are trained solely by being
    pushed down in the softmax, so they collapse onto one direction and a low-rank `upper` adapter cannot tell them
    apart. Copying mixed-case text gives every letter a distinct, meaningful embedding in both cases.
    """
    if rng.random() < 0.5:
        return text
    return "".join(c.upper() if rng.random() < 0.5 else c for c in text)


def train_loop(model, tokenizer, task: str, steps: int, lr: float, batch_size: int, rng, exclude: set[str],
               vary_case: bool = False) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    # Linear warm-up then cosine decay to 5%: the decaying LR is what lets `reverse` converge in ~2k steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))),
    )
    transform = tasks.TRANSFORMS[task]
    model.train()
    for step in range(steps):
        texts = []
        while len(texts) < batch_size:
            text = tasks.random_text(rng)
            if text not in exclude:
                texts.append(mixed_case(text, rng) if vary_case else text)
        ids, mask, labels = make_batch(tokenizer, [(t, transform(t)) for t in texts])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d/%d loss %.4f lr %.2e", task, step, steps, loss.item(), schedule.get_last_lr()[0])
    model.eval()


@torch.no_grad()
def exact_match(model, tokenizer, task: str, texts: list[str]) -> float:
    """Greedy, batched, no KV cache (the model is tiny): fraction of texts whose output equals the transform."""
    eos = tokenizer.token_to_id(EOS)
    transform = tasks.TRANSFORMS[task]
    prompts = [tokenizer.encode(tasks.make_prompt(t)).ids for t in texts]
    outputs: list[list[int]] = [[] for _ in texts]
    done = [False] * len(texts)
    for _ in range(tasks.MAX_TEXT_CHARS + 2):
        seqs = [p + o for p, o in zip(prompts, outputs, strict=True)]
        width = max(len(s) for s in seqs)
        # Left padding keeps every row's next-token logit in the last column.
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        next_ids = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
        for i, token in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if token == eos:
                done[i] = True
            else:
                outputs[i].append(token)
        if all(done):
            break
    hits = sum(
        d and tokenizer.decode(o) == transform(t) for t, o, d in zip(texts, outputs, done, strict=True)
    )
    return hits / len(texts)


def write_model_dir(model, tokenizer: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": model.config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--base-steps", type=int, default=2000)
    parser.add_argument("--only-adapters", action="store_true", help="reuse the base model already in --out")
    parser.add_argument("--adapters", nargs="*", default=None, help="train only these adapters (default: all)")
    parser.add_argument("--adapter-steps-scale", type=float, default=1.0, help="for smoke runs only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tokenizer = build_tokenizer()
    eval_texts = tasks.held_out_texts(tasks.NUM_EVAL_TEXTS, tasks.EVAL_SEED)
    exclude = set(eval_texts)
    model_dir = args.out / "model"

    if args.only_adapters:
        base = LlamaForCausalLM.from_pretrained(model_dir)
    else:
        config = LlamaConfig(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, so the demo exercises GQA
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        base = LlamaForCausalLM(config)
        train_loop(base, tokenizer, "copy", args.base_steps, 3e-3, 64, rng, exclude, vary_case=True)
        logger.info("base copy exact match: %.3f", exact_match(base, tokenizer, "copy", eval_texts))
        write_model_dir(base, tokenizer, model_dir)

    for param in base.parameters():
        param.requires_grad_(False)
    for recipe in ADAPTER_RECIPES:
        if args.adapters is not None and recipe.name not in args.adapters:
            continue
        # Each adapter draws from its own seeded streams, so any subset retrains to the same files.
        torch.manual_seed(SEED + sum(map(ord, recipe.name)))
        rng = random.Random(f"{SEED}-{recipe.name}")
        lora_config = LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.alpha,
            use_rslora=recipe.use_rslora,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        peft_model = get_peft_model(base, lora_config, adapter_name=recipe.name)
        steps = max(1, int(recipe.steps * args.adapter_steps_scale))
        train_loop(peft_model, tokenizer, recipe.name, steps, recipe.lr, 64, rng, exclude)
        accuracy = exact_match(peft_model, tokenizer, recipe.name, eval_texts)
        logger.info("adapter %s exact match: %.3f", recipe.name, accuracy)
        adapter_dir = args.out / "adapters" / recipe.name
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model.save_pretrained(args.out / "adapters", selected_adapters=[recipe.name])
        base = peft_model.unload() if isinstance(peft_model, PeftModel) else peft_model
    (args.out / "adapters" / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub, not ours


if __name__ == "__main__":
    main()
