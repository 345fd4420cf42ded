"""Chat messages -> one prompt string, by the model's own template (`chat_template` in tokenizer_config.json), rendered
with jinja2 as transformers renders it: a sandbox, trim_blocks and lstrip_blocks, `raise_exception` available."""

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by this template (the template itself refused them, or it is broken)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)  # a syntax error surfaces here, at load, not per request
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ChatTemplate | None":
        """The template in `tokenizer_config.json`, or None when the model has none."""
        path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
            named = {item.get("name"): item.get("template") for item in source if isinstance(item, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                        add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except TemplateError as error:
            raise ChatTemplateError(f"the model's chat template refused the messages: {error}") from None


def _token_text(token: object) -> str:
    """tokenizer_config.json writes special tokens as a string or as {"content": str, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def _raise(message: str) -> None:
    raise TemplateError(message)
