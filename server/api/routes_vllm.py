"""vLLM's routes, in vLLM's shapes, for users who script against them:

- POST /v1/load_lora_adapter `{"lora_name", "lora_path", "load_inplace"}` stores the adapter in a local directory
  (validated exactly like an upload) as the caller's adapter `lora_name`; POST /v1/unload_lora_adapter `{"lora_name"}`
  deletes it. Admin only, and only from under `--adapter-dirs-allowed` (without it both are 403). Both answer vLLM's
  plain-text "Success: ..." line.
- POST /tokenize `{"prompt"}` or `{"messages"}` -> `{"count", "max_model_len", "tokens", "token_strs"}`;
  POST /detokenize `{"tokens"}` -> `{"prompt"}`; GET /version -> `{"version"}`.

Errors are OpenAI's shape, as vLLM answers them (errors.OPENAI_PATHS)."""

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from lora_server.adapters_store.upload import check_id
from lora_server.api.adapter_dirs import AdapterDirError, allowed_dir, read_adapter_dir, require_adapter_dirs
from lora_server.api.auth import require_admin
from lora_server.api.chat_template import ChatTemplateError, Message
from lora_server.api.cli_options import package_version
from lora_server.api.deps import CallerDep, StateDep
from lora_server.api.errors import invalid_request
from lora_server.api.openai_schemas import ChatMessage
from lora_server.api.routes_adapters import check_adapter_id, delete_adapter, require_store, store_version
from lora_server.api.schemas import VALID_TEXT, AdapterIdText, Text

logger = logging.getLogger(__name__)
router = APIRouter()


# ---------------------------------------------------------------- adapters by path


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: AdapterIdText = Field(description="the adapter's id for the caller's tenant")
    lora_path: Text = Field(description="an absolute path under one of the server's --adapter-dirs-allowed")
    load_inplace: StrictBool = Field(default=False, description="replace an adapter of that name (a new version)")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: AdapterIdText


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             summary="vLLM's: store an adapter from a directory on the server (admin; --adapter-dirs-allowed)")
async def load_lora_adapter(body: LoadLoraAdapterRequest, state: StateDep, principal: CallerDep) -> PlainTextResponse:
    require_admin(principal)
    directory = allowed_dir(body.lora_path, state.config.adapter_dirs_allowed)
    served = state.require_served()
    store = require_store(served)
    check_adapter_id(served, principal, body.lora_name, must_be_new=not body.load_inplace)
    try:
        files = await asyncio.to_thread(read_adapter_dir, directory, store.limits, state.config.adapter_dirs_allowed)
    except AdapterDirError as error:
        raise invalid_request(str(error), param="lora_path") from None
    record = await store_version(state, served, principal, body.lora_name, files, must_be_new=not body.load_inplace)
    logger.info("tenant %s loaded adapter %s version %d from %s", principal.tenant, body.lora_name, record.version,
                directory)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             summary="vLLM's: delete an adapter (admin; --adapter-dirs-allowed)")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, state: StateDep,
                              principal: CallerDep) -> PlainTextResponse:
    require_admin(principal)
    require_adapter_dirs(state.config.adapter_dirs_allowed)  # the pair is one feature: off, both are 403
    check_id(body.lora_name, "lora_name")  # before the store looks it up
    await delete_adapter(body.lora_name, state, principal)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# ---------------------------------------------------------------- tokens


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(default=None, description="accepted for vLLM's clients: every adapter shares the "
                                                         "base model's tokenizer")
    prompt: Annotated[str | None, VALID_TEXT] = Field(default=None, description='exactly one of "prompt" and '
                                                                                 '"messages"')
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = Field(default=None, description="prompt: default true (BOS); messages: "
                                                                            "only false (the template writes them)")
    add_generation_prompt: StrictBool = Field(default=True, description="messages: end with the assistant's turn")
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    tokens: list[StrictInt]


@router.post("/tokenize", summary="vLLM's: a prompt or chat messages as the model's token ids")
async def tokenize(body: TokenizeRequest, state: StateDep, principal: CallerDep) -> dict:
    served = state.require_served()
    backend = served.tokenizer.backend
    if (body.prompt is None) == (body.messages is None):
        raise invalid_request('give exactly one of "prompt" and "messages"', param="prompt")
    if body.prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        encoding = backend.encode(body.prompt, add_special_tokens=add_special)
    else:
        if body.add_special_tokens:
            raise invalid_request("add_special_tokens must be false with messages: the chat template writes its own",
                                  param="add_special_tokens")
        if served.chat_template is None:
            raise invalid_request(f"the model {served.model_name!r} has no chat template", param="messages",
                                  code="no_chat_template")
        for index, message in enumerate(body.messages):
            message.check_role(index)
        messages = [Message(message.role, message.text(index)) for index, message in enumerate(body.messages)]
        try:
            text = served.chat_template.render(messages, add_generation_prompt=body.add_generation_prompt)
        except ChatTemplateError as error:
            raise invalid_request(str(error), param="messages") from None
        encoding = backend.encode(text, add_special_tokens=False)
    return {"count": len(encoding.ids), "max_model_len": served.max_model_len, "tokens": encoding.ids,
            "token_strs": encoding.tokens if body.return_token_strs else None}


@router.post("/detokenize", summary="vLLM's: token ids as text")
async def detokenize(body: DetokenizeRequest, state: StateDep, principal: CallerDep) -> dict:
    served = state.require_served()
    backend = served.tokenizer.backend
    vocab_size = backend.get_vocab_size()
    if any(not 0 <= token < vocab_size for token in body.tokens):
        raise invalid_request(f"tokens must be integers in [0, {vocab_size})", param="tokens")
    # special tokens kept, as vLLM's /detokenize does: tokenize then detokenize gives the prompt back
    return {"prompt": backend.decode(body.tokens, skip_special_tokens=False)}


@router.get("/version", summary="The server's version")
async def server_version(principal: CallerDep) -> dict:
    return {"version": package_version()}
