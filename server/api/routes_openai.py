"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` names the adapter; the base model's own name means no adapter. An unknown name is a 404 (code
`model_not_found`), never silently the base model. Streams are OpenAI's: `data: {chunk}` events, an optional usage
chunk (`stream_options.include_usage`), then `data: [DONE]`."""

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lora_server.adapters_store import AdapterNotFound
from lora_server.adapters_store.upload import check_id
from lora_server.api import openai_format as fmt
from lora_server.api.auth import Principal
from lora_server.api.chat_template import ChatTemplateError, Message
from lora_server.api.deps import CallerDep, StateDep
from lora_server.api.errors import NOT_FOUND, ApiError, invalid_request
from lora_server.api.generation import (
    TrackedStream,
    build_request,
    error_of,
    merged,
    new_id,
    submit_all,
    until_disconnected,
)
from lora_server.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from lora_server.api.sse import DONE, EventStreamResponse, sse_event
from lora_server.api.state import Served, ServerState
from lora_server.engine.request import EngineRequest, RequestDelta

router = APIRouter()
OPENAI_DEFAULT_TEMPERATURE = 1.0


# ---------------------------------------------------------------- /v1/models


@router.get("/v1/models", summary="The base model and the caller's adapters (OpenAI's model list)")
async def list_models(state: StateDep,
                      principal: CallerDep) -> dict:
    served = state.require_served()
    return {"object": "list", "data": _model_cards(served, principal)}


@router.get("/v1/models/{model:path}", summary="One model: the base or one of the caller's adapters")
async def retrieve_model(model: str, state: StateDep,
                         principal: CallerDep) -> dict:
    served = state.require_served()
    for card in _model_cards(served, principal):
        if card["id"] == model:
            return card
    raise _model_not_found(served, model)


def _model_cards(served: Served, principal: Principal) -> list[dict]:
    base = served.model_name
    cards = [fmt.model_card(base, int(served.loaded_at), "lora-server", None, base)]
    if served.store is not None:
        cards += [fmt.model_card(record.adapter_id, int(record.created_at), principal.tenant, base, base)
                  for record in served.store.list_adapters(principal.tenant)]
    return cards


def _model_not_found(served: Served, model: str) -> ApiError:
    return ApiError(404, NOT_FOUND, f"the model {model!r} does not exist: it is neither the base model "
                                    f"{served.model_name!r} nor one of your adapters", param="model",
                    code="model_not_found")


def _adapter_of(served: Served, model: str) -> str | None:
    """The adapter a `model` names (None: the base model); a 400 naming `model` for a malformed id, before any store
    access."""
    if model == served.model_name:
        return None
    check_id(model, "model")
    return model


def _submit(served: Served, state: ServerState, model: str, requests: list[EngineRequest]) -> list[TrackedStream]:
    try:
        return submit_all(served, state.metrics, requests)
    except AdapterNotFound:
        raise _model_not_found(served, model) from None


# ---------------------------------------------------------------- /v1/completions


@router.post("/v1/completions", summary="OpenAI completions: text in, text out")
async def completions(body: CompletionRequest, request: Request, state: StateDep,
                      principal: CallerDep) -> Response:
    served = state.require_served()
    body.refuse_unsupported()
    adapter_id = _adapter_of(served, body.model)
    response_id, created = new_id("cmpl"), int(time.time())
    requests = []
    for index, prompt in enumerate(body.prompts(state.config.max_prompts_per_request)):
        prompt_ids = served.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        requests.append(_engine_request(served, state, principal, body, adapter_id, prompt_ids, body.max_tokens,
                                        body.logprobs, f"{response_id}-{index}"))
    streams = _submit(served, state, body.model, requests)
    decode = served.tokenizer.decode

    if not body.stream:
        results = await _collect_all(request, streams)
        choices = [fmt.completion_choice(index, collected.text, stream.finish_reason,
                                         None if collected.logprobs is None else
                                         fmt.completion_logprobs(collected.logprobs, decode))
                   for index, (stream, collected) in enumerate(zip(streams, results, strict=True))]
        return JSONResponse(fmt.completion(response_id, created, body.model, choices, _usage(streams)),
                            headers=streams[0].timing_headers())

    heads = await _first_tokens(request, streams)

    async def events() -> AsyncIterator[bytes]:
        offsets = [0] * len(streams)
        async for index, delta in merged(streams, heads):
            if not delta.text and not delta.is_finished and not delta.logprobs:
                continue
            logprobs = None
            if delta.logprobs is not None:
                logprobs = fmt.completion_logprobs(delta.logprobs, decode, offsets[index])
            offsets[index] += len(delta.text)
            choice = fmt.completion_choice(index, delta.text, delta.finish_reason, logprobs)
            yield sse_event(fmt.completion_chunk(response_id, created, body.model, [choice]))
            if delta.error:
                yield sse_event(_stream_error(delta))
        if body.include_usage:
            yield sse_event(fmt.completion_chunk(response_id, created, body.model, [], _usage(streams)))
        yield DONE

    return _event_stream(events(), streams)


# ---------------------------------------------------------------- /v1/chat/completions


@router.post("/v1/chat/completions", summary="OpenAI chat completions: messages in, an assistant message out")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep,
                           principal: CallerDep) -> Response:
    served = state.require_served()
    body.refuse_unsupported()
    adapter_id = _adapter_of(served, body.model)
    if served.chat_template is None:
        raise invalid_request(f"the model {served.model_name!r} has no chat template (tokenizer_config.json has no "
                              "chat_template): use /v1/completions", code="no_chat_template")
    messages = [Message(message.role, message.text(index)) for index, message in enumerate(body.messages)]
    try:
        prompt = served.chat_template.render(messages)
    except ChatTemplateError as error:
        raise invalid_request(str(error), param="messages") from None
    # The template writes its own special tokens (BOS included), as transformers' apply_chat_template does.
    prompt_ids = served.tokenizer.backend.encode(prompt, add_special_tokens=False).ids
    response_id, created = new_id("chatcmpl"), int(time.time())
    num_top = body.top_logprobs or 0
    engine_request = _engine_request(served, state, principal, body, adapter_id, prompt_ids, body.requested_max_tokens,
                                     num_top if body.logprobs else None, response_id,
                                     max_tokens_param="max_completion_tokens" if body.max_completion_tokens
                                     is not None else "max_tokens", logprobs_param="top_logprobs")
    streams = _submit(served, state, body.model, [engine_request])
    stream, decode = streams[0], served.tokenizer.decode

    if not body.stream:
        (collected,) = await _collect_all(request, streams)
        logprobs = None if collected.logprobs is None else fmt.chat_logprobs(collected.logprobs, decode, num_top)
        choice = fmt.chat_choice(0, collected.text, stream.finish_reason, logprobs)
        return JSONResponse(fmt.chat_completion(response_id, created, body.model, [choice], _usage(streams)),
                            headers=stream.timing_headers())

    heads = await _first_tokens(request, streams)

    async def events() -> AsyncIterator[bytes]:
        def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> bytes:
            choice = fmt.chat_chunk_choice(0, delta, finish_reason, logprobs)
            return sse_event(fmt.chat_chunk(response_id, created, body.model, [choice]))

        yield chunk({"role": "assistant", "content": ""})
        async for _, delta in merged(streams, heads):
            logprobs = None if delta.logprobs is None else fmt.chat_logprobs(delta.logprobs, decode, num_top)
            if delta.text or logprobs:
                yield chunk({"content": delta.text}, logprobs=logprobs)
            if delta.is_finished:
                yield chunk({}, delta.finish_reason)
                if delta.error:
                    yield sse_event(_stream_error(delta))
        if body.include_usage:
            yield sse_event(fmt.chat_chunk(response_id, created, body.model, [], _usage(streams)))
        yield DONE

    return _event_stream(events(), streams)


# ---------------------------------------------------------------- shared


def _engine_request(served: Served, state: ServerState, principal: Principal,
                    body: CompletionRequest | ChatCompletionRequest, adapter_id: str | None, prompt_ids: list[int],
                    max_tokens: int | None, logprobs: int | None, request_id: str,
                    max_tokens_param: str = "max_tokens", logprobs_param: str = "logprobs") -> EngineRequest:
    return build_request(
        served, state.config, principal, prompt_token_ids=prompt_ids, adapter_id=adapter_id,
        max_new_tokens=max_tokens,
        temperature=OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
        stop=body.stop_list, logprobs=logprobs, request_id=request_id, max_tokens_param=max_tokens_param,
        extras=body.sampling_extras(), logprobs_param=logprobs_param)


async def _collect_all(request: Request, streams: list[TrackedStream]) -> list:
    try:
        results = await until_disconnected(request, asyncio.gather(*(stream.collect() for stream in streams)))
    finally:
        for stream in streams:
            stream.abort_now()
    for collected in results:
        if (error := error_of(collected.last)) is not None:
            raise error
    return results


async def _first_tokens(request: Request, streams: list[TrackedStream]) -> list[list[RequestDelta]]:
    """Wait for each stream's first token, so the headers carry the timings and an early failure is an HTTP error."""
    try:
        heads = await until_disconnected(request, asyncio.gather(*(s.until_first_token() for s in streams)))
        for head in heads:
            if (error := error_of(head[-1])) is not None:
                raise error
    except BaseException:
        for stream in streams:
            stream.abort_now()
        raise
    return heads


def _event_stream(events: AsyncIterator[bytes], streams: list[TrackedStream]) -> EventStreamResponse:
    async def close() -> None:
        for stream in streams:
            stream.abort_now()

    return EventStreamResponse(events, on_close=close, headers=streams[0].timing_headers())


def _usage(streams: list[TrackedStream]) -> dict[str, int]:
    return fmt.usage(sum(s.num_prompt_tokens for s in streams), sum(s.num_generated_tokens for s in streams))


def _stream_error(delta: RequestDelta) -> dict:
    """A failure after the stream began: OpenAI's error object as one more event (as vLLM does), then [DONE]."""
    return {"error": {"message": f"the request failed: {delta.error}", "type": "server_error", "param": None,
                      "code": None}}
