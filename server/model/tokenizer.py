"""Text <-> token ids for a checkpoint directory: `tokenizer.json` through the `tokenizers` library, plus the EOS ids
from `generation_config.json` (or `tokenizer_config.json`). The chat template is the API's to read
(server.api.chat_template)."""

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from lora_server.model.config import ModelConfigError


@dataclass(frozen=True)
class Tokenizer:
    backend: HFTokenizer
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]:
        """Ids as the model was trained to see them (the tokenizer's post-processor adds BOS where it should)."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path, config_eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelConfigError(f"{model_dir} has no tokenizer.json")
    backend = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    generation_config = _read_json(model_dir / "generation_config.json")

    eos: list[int] = []
    for source in (generation_config.get("eos_token_id"), list(config_eos_token_ids)):
        for token_id in source if isinstance(source, list) else [source]:
            if token_id is not None and token_id not in eos:
                eos.append(int(token_id))
    if not eos and isinstance(tokenizer_config.get("eos_token"), str):
        token_id = backend.token_to_id(tokenizer_config["eos_token"])
        if token_id is not None:
            eos.append(token_id)
    return Tokenizer(backend=backend, eos_token_ids=tuple(eos))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
