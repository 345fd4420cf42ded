"""Chat messages -> one prompt string, by the model's own template (`chat_template` in tokenizer_config.json), rendered
with jinja2 as transformers renders it (tests/api/test_chat_template.py compares the two on real-world templates): a
sandbox, trim_blocks and lstrip_blocks, the `loopcontrols` extension ({% break %}, {% continue %}), transformers'
`tojson` (no HTML escaping, indent and separators), `raise_exception`, `strftime_now`, `dict`, a `namespace` that
refuses underscore names, `tools` and `documents` as None, and `{% generation %}` blocks rendered as plain text."""

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
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
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.globals["dict"] = dict
        env.globals["namespace"] = _Namespace
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
                                        eos_token=self.eos_token, tools=None, documents=None)
        except (TemplateError, TypeError, ValueError) as error:  # a template's own bug is the request's 400, not a 500
            raise ChatTemplateError(f"the model's chat template refused the messages: {error}") from None


def _token_text(token: object) -> str:
    """tokenizer_config.json writes special tokens as a string or as {"content": str, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Why not jinja's own: it escapes <, >, & and ' for HTML, which changes prompts; transformers' does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace(), refusing underscore names as transformers does (no reaching CPython internals)."""

    def __init__(*args, **kwargs) -> None:  # jinja's own signature trick, so namespace(self=...) still works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: object) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed names on a namespace: {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; a server renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)
