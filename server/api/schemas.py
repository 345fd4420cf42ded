"""Request and response bodies of the server's own routes (/v1/generate, /v1/adapters). Pydantic stops here: routes
turn these into the engine's dataclasses at once.

Ranges of the sampling numbers are checked by SamplingParams itself (one source of truth), not repeated here.
Every string a client sends is checked to be valid UTF-8 text (JSON's `\\ud800` escapes can smuggle in lone
surrogates, which the tokenizer and SQLite cannot take): `Text` for a string field, `Annotated[..., VALID_TEXT]` on a
union of strings and lists (so the error names the field, not one of the union's members). Fields holding an adapter
id are `AdapterIdText`: its schema documents the store's one id rule, which the routes check
(`adapters_store.upload.check_id`) before any store access."""

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lora_server.adapters_store.upload import ID_PATTERN, ID_RULE, ROUTE_WORDS


def _utf8_text(value: object) -> object:
    """`value` once every string in it (itself, or in its lists and models, however nested) is valid UTF-8 text."""
    if isinstance(value, list):
        for item in value:
            _utf8_text(item)
    elif isinstance(value, BaseModel):
        for item in vars(value).values():
            _utf8_text(item)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("invalid_text", "not valid UTF-8 text: it holds a lone surrogate (such as "
                                                      "\\ud800)") from None
    return value


VALID_TEXT = AfterValidator(_utf8_text)
Text = Annotated[str, VALID_TEXT]
ID_DESCRIPTION = f"{ID_RULE}; not all dots, and not {' or '.join(ROUTE_WORDS)}"
AdapterIdText = Annotated[Text, WithJsonSchema({"type": "string", "pattern": ID_PATTERN.pattern,
                                                "description": ID_DESCRIPTION})]
# The rule `_one_prompt` enforces, in the schema: exactly one of the two, as a string or a list of token ids.
ONE_PROMPT_SCHEMA = {"oneOf": [
    {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    {"required": ["prompt_token_ids"], "properties": {"prompt_token_ids": {"type": "array"}}},
]}


class SamplingExtras(BaseModel):
    """vLLM's sampling extras, on the native route and both OpenAI routes, passed to the engine's SamplingParams by
    these same names (whose ranges it checks). None: not sent, so SamplingParams' own default applies."""

    repetition_penalty: float | None = Field(default=None, description="1: off; above 1 discourages tokens already "
                                                                       "in the prompt or output")
    presence_penalty: float | None = Field(default=None, description="0: off; subtracted once from every token "
                                                                     "already generated")
    frequency_penalty: float | None = Field(default=None, description="0: off; subtracted per occurrence of a token "
                                                                      "already generated")
    min_p: float | None = Field(default=None, description="0: off; drop tokens below min_p x the top probability")
    min_tokens: StrictInt | None = Field(default=None, description="no EOS or stop before this many tokens")
    ignore_eos: StrictBool | None = Field(default=None, description="keep generating past EOS")
    stop_token_ids: list[StrictInt] | None = Field(default=None, description="generation ends at any of these "
                                                                             "token ids")
    include_stop_str_in_output: StrictBool | None = Field(default=None, description="keep the stop string in the "
                                                                                    "text")

    def sampling_extras(self) -> dict[str, object]:
        """The extras the client sent, as SamplingParams' keyword arguments."""
        extras: dict[str, object] = {name: getattr(self, name) for name in SAMPLING_EXTRAS
                                     if getattr(self, name) is not None}
        if "stop_token_ids" in extras:
            extras["stop_token_ids"] = tuple(extras["stop_token_ids"])  # SamplingParams is frozen: a tuple
        return extras


SAMPLING_EXTRAS = tuple(SamplingExtras.model_fields)


class GenerateRequest(SamplingExtras):
    # extra="forbid": a misspelt field is an error, not a silently ignored default
    model_config = ConfigDict(extra="forbid", json_schema_extra=ONE_PROMPT_SCHEMA)

    prompt: Text | None = Field(default=None, description='exactly one of "prompt" and "prompt_token_ids"')
    prompt_token_ids: list[StrictInt] | None = None
    adapter_id: AdapterIdText | None = Field(default=None, description="an adapter of the caller's tenant; null: "
                                                                        "the base model")
    max_new_tokens: StrictInt | None = Field(default=None, description="default: the server's --default-max-new-tokens")
    temperature: float = Field(default=0.0, description="0: greedy")
    top_p: float = 1.0
    top_k: StrictInt = Field(default=0, description="0: no top-k cut")
    seed: StrictInt | None = None
    stop: list[Text] = Field(default_factory=list, description="generation ends before the first of these strings")
    logprobs: StrictInt | None = Field(default=None, description="the chosen token's logprob and this many "
                                                                "alternatives per token")
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError('give exactly one of "prompt" and "prompt_token_ids"')
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TokenLogprobBody(BaseModel):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(description="(token id, logprob) of the most likely tokens, best first")


class GenerateResponse(BaseModel):
    id: str
    adapter_id: str | None
    adapter_version: int | str | None
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprobBody] | None = None


# ---------------------------------------------------------------- adapters


class AdapterVersionBody(BaseModel):
    version: int
    sha256: str = Field(description="of the version's content: both files")
    ranks: list[int] = Field(description="the distinct LoRA ranks, ascending")
    num_bytes: int
    created_at: float = Field(description="Unix seconds")
    state: Literal["ready", "unusable"]


class AdapterCreated(BaseModel):
    id: str
    version: int
    sha256: str
    ranks: list[int]
    num_bytes: int
    created_at: float
    parent: str = Field(description="the base model it runs on")


class AdapterSummary(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    version: int = Field(description="the latest version: what a new request runs with")
    sha256: str
    ranks: list[int]
    num_bytes: int
    created_at: float
    state: Literal["ready", "unusable"]
    parent: str


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterSummary]


class AdapterDetail(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    parent: str
    current_version: int
    versions: list[AdapterVersionBody] = Field(description="oldest first")
    tier: Literal["device", "host", "disk"] = Field(description="where its newest loaded version sits now")
    merged: bool = Field(description="merged into the base weights now (see POST /v1/adapters/{id}/merge)")
    requests_served: int = Field(description="finished requests since this server started, all versions")
    requests_served_by_version: dict[int, int]


class AdapterDeleted(BaseModel):
    id: str
    deleted: Literal[True] = True
    versions: list[int]


# ---------------------------------------------------------------- merging and combining


class AdapterMerged(BaseModel):
    adapter_id: str
    version: int = Field(description="the version merged: the newest when the merge was asked for")
    merged: Literal[True] = True


class AdapterUnmerged(BaseModel):
    adapter_id: str
    merged: Literal[False] = False


class CombineSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: AdapterIdText = Field(description="an adapter of the caller's tenant; its newest version is read")
    weight: float = Field(default=1.0, description="its delta is scaled by this (any finite number)")


class CombineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: AdapterIdText = Field(description="the new adapter's id (it must not exist yet)")
    sources: list[CombineSource] = Field(max_length=64)
    method: Text = Field(default="linear", description="linear: exact, the ranks concatenated; svd: the summed "
                                                       "delta truncated to `rank`")
    rank: StrictInt | None = Field(default=None, description="svd only: the result's rank")


class AdapterCombined(AdapterCreated):
    relative_error: float = Field(description="‖combined − Σ weight·delta‖ / ‖Σ weight·delta‖ (Frobenius, all "
                                              "modules): 0 for linear")
