"""Request bodies of the OpenAI-compatible routes, as OpenAI's clients send them.

Nothing is silently ignored. Unknown fields are a 400 naming the field (extra="forbid"), except those OpenAI's clients
send that change nothing in the output here (`NO_OP_FIELDS`: `user`, `metadata`, `store`...). Fields that would change
the output in a way this server does not implement (n > 1, echo, logit_bias, tools...) are a 400 naming the field,
code `unsupported_parameter`. vLLM's sampling extras (`SamplingExtras`: penalties, min_p, min_tokens, ignore_eos...)
are accepted and passed to the engine. Responses are built as plain dicts in openai_format.py. Strings are checked to
be valid UTF-8 text (`Text`, `VALID_TEXT`: see schemas.py)."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from lora_server.api.errors import ApiError, invalid_request
from lora_server.api.schemas import VALID_TEXT, SamplingExtras, Text

# What a chat message may be. A message of any other role would reach the template, which renders only the roles it
# knows: it would be dropped without a word. `developer` and `tool` are OpenAI's, but this server runs no tools and
# its templates know no developer role, so they are refused with the reason.
CHAT_ROLES = ("system", "user", "assistant")
REFUSED_ROLES = {"developer": "this server has no developer role: send the instructions as a 'system' message",
                 "tool": "this server does not call tools (`tools` is refused), so there are no tool results"}
# OpenAI's request fields that only concern OpenAI's own bookkeeping (end-user ids, stored completions, billing
# tiers, its prompt cache): accepted, since changing nothing in the output here is exactly what they would do.
NO_OP_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                "prompt_cache_retention")


def unsupported(field: str, why: str) -> ApiError:
    return invalid_request(f"{field} is not supported: {why}", param=field, code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; nothing to pad here


class _SamplingFields(SamplingExtras):
    # extra="forbid": an unknown field is a 400 naming it, never a silently ignored default
    model_config = ConfigDict(extra="forbid")

    model: Text
    temperature: float | None = None  # None: OpenAI's default, 1
    top_p: float | None = None
    top_k: StrictInt | None = None  # not OpenAI's; vLLM's extension, accepted the same way
    seed: StrictInt | None = None
    stop: Annotated[str | list[str] | None, VALID_TEXT] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = 1
    logit_bias: dict[str, float] | None = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise unsupported("n", "only n=1 is supported")
        if self.logit_bias:
            raise unsupported("logit_bias", "this server does not bias logits")
        if self.stream_options is not None and not self.stream:
            # OpenAI answers the same: the options only mean anything for a stream
            raise invalid_request("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: Annotated[str | list[StrictInt] | list[str] | list[list[StrictInt]], VALID_TEXT] = Field(
        description="one prompt (text or token ids), or a list of them (each its own choice; at most the server's "
                    "--max-prompts-per-request)")
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None
    echo: bool | None = False
    best_of: StrictInt | None = None
    suffix: Text | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for field, refused, why in (("echo", bool(self.echo), "the prompt is not repeated in the output"),
                                    ("best_of", self.best_of not in (None, 1), "only best_of=1 is supported"),
                                    ("suffix", bool(self.suffix), "this server does not fill in the middle")):
            if refused:
                raise unsupported(field, why)

    def prompts(self, max_prompts: int) -> list[str | list[int]]:
        """One prompt (text or token ids) per choice; at most `max_prompts`, so that one request cannot take every
        queue slot at once."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise invalid_request("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if len(prompt) > max_prompts:
            raise invalid_request(f"prompt is a list of {len(prompt)} prompts, over this server's limit of "
                                  f"{max_prompts} per request", param="prompt", code="too_many_prompts")
        return list(prompt)


class ContentPart(BaseModel):
    """Its strings are checked by ChatMessage.content's VALID_TEXT (so the error names `content`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Text = Field(json_schema_extra={"enum": list(CHAT_ROLES)})
    content: Annotated[str | list[ContentPart] | None, VALID_TEXT] = None

    def check_role(self, index: int) -> None:
        if self.role in CHAT_ROLES:
            return
        why = REFUSED_ROLES.get(self.role, f"a message's role is one of {', '.join(CHAT_ROLES)}")
        raise invalid_request(f"messages[{index}].role {self.role!r} is not supported: {why}",
                              param=f"messages[{index}].role")

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise invalid_request(f"messages[{index}]: only text content parts are supported, got {part.type!r}",
                                      param="messages")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # None: up to the model's maximum length (and the server's cap)
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    logprobs: bool = False
    top_logprobs: StrictInt | None = None
    response_format: dict | None = None
    # OpenAI's fields for what this server does not do; each is refused below unless it asks for nothing
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # only means anything with tools, which are refused
    functions: list | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        checks = [("tools", bool(self.tools), "this server does not call tools"),
                  ("functions", bool(self.functions), "this server does not call functions"),
                  ("tool_choice", self.tool_choice not in (None, "none"), "this server does not call tools"),
                  ("function_call", self.function_call not in (None, "none"), "this server does not call functions"),
                  ("response_format", bool(self.response_format) and self.response_format.get("type", "text")
                   != "text", "only the text response_format is supported (no guided decoding)"),
                  ("modalities", self.modalities not in (None, ["text"]), "only text output is supported"),
                  ("audio", self.audio is not None, "only text output is supported"),
                  ("prediction", self.prediction is not None, "predicted outputs are not supported"),
                  ("web_search_options", self.web_search_options is not None, "this server does not search"),
                  ("reasoning_effort", self.reasoning_effort is not None, "this model does not reason apart"),
                  ("verbosity", self.verbosity is not None, "the model's verbosity cannot be set")]
        for field, refused, why in checks:
            if refused:
                raise unsupported(field, why)
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_request("top_logprobs needs logprobs: true", param="top_logprobs")
        for index, message in enumerate(self.messages):
            message.check_role(index)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

