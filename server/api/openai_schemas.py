"""Request bodies of the OpenAI-compatible routes, as OpenAI's clients send them.

Unknown fields are ignored (clients send fields such as `user` that change nothing here); fields that would change
the output in a way this server does not implement (n > 1, echo, penalties, logit_bias, tools...) are refused with a
400 naming the field, never silently ignored. Responses are built as plain dicts in openai_format.py. Strings are
checked to be valid UTF-8 text (`Text`, `VALID_TEXT`: see schemas.py)."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from lora_server.api.errors import invalid_request
from lora_server.api.schemas import VALID_TEXT, Text

# What a chat message may be. A message of any other role would reach the template, which renders only the roles it
# knows: it would be dropped without a word. `developer` and `tool` are OpenAI's, but this server runs no tools and
# its templates know no developer role, so they are refused with the reason.
CHAT_ROLES = ("system", "user", "assistant")
REFUSED_ROLES = {"developer": "this server has no developer role: send the instructions as a 'system' message",
                 "tool": "this server does not call tools (`tools` is refused), so there are no tool results"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text
    temperature: float | None = None  # None: OpenAI's default, 1
    top_p: float | None = None
    top_k: StrictInt | None = None  # not OpenAI's; vLLM's extension, accepted the same way
    seed: StrictInt | None = None
    stop: Annotated[str | list[str] | None, VALID_TEXT] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        checks = [("n", self.n != 1, "only n=1 is supported"),
                  ("presence_penalty", self.presence_penalty != 0, "penalties are not supported"),
                  ("frequency_penalty", self.frequency_penalty != 0, "penalties are not supported"),
                  ("logit_bias", bool(self.logit_bias), "logit_bias is not supported")]
        for field, refused, why in checks:
            if refused:
                raise invalid_request(why, param=field, code="unsupported_parameter")

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
    echo: bool = False
    best_of: StrictInt | None = None
    suffix: Text | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for field, refused in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)),
                               ("suffix", bool(self.suffix))):
            if refused:
                raise invalid_request(f"{field} is not supported", param=field, code="unsupported_parameter")

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
    tools: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise invalid_request("tools are not supported", param="tools", code="unsupported_parameter")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise invalid_request("only the text response_format is supported", param="response_format",
                                  code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_request("top_logprobs needs logprobs: true", param="top_logprobs")
        for index, message in enumerate(self.messages):
            message.check_role(index)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

