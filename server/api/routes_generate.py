"""POST /v1/generate: the server's own generation route (text or token ids in, text and token ids out).

With `"stream": true` the answer is Server-Sent Events: one `data:` event per engine delta
(`{"id", "text", "token_ids"}`), the last one with `finish_reason` and `usage` as well.

Streaming or not, the response starts once the first token exists, so its headers carry the queue time and the time
to first token, and a request that fails before producing anything gets a proper HTTP error."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lora_server.adapters_store.upload import check_id
from lora_server.api.deps import CallerDep, StateDep
from lora_server.api.generation import TrackedStream, build_request, error_of, new_id, until_disconnected
from lora_server.api.schemas import GenerateRequest, GenerateResponse
from lora_server.api.sse import EventStreamResponse, sse_event
from lora_server.engine.request import RequestDelta, TokenLogprob

router = APIRouter()


@router.post("/v1/generate", response_model=GenerateResponse, summary="Generate with the base model or an adapter")
async def generate(body: GenerateRequest, request: Request, state: StateDep,
                   principal: CallerDep) -> Response:
    served = state.require_served()
    if body.adapter_id is not None:
        check_id(body.adapter_id, "adapter_id")  # before the engine looks it up in the store
    prompt_ids = body.prompt_token_ids if body.prompt is None else served.tokenizer.encode(body.prompt)
    engine_request = build_request(
        served, state.config, principal, prompt_token_ids=prompt_ids, adapter_id=body.adapter_id,
        max_new_tokens=state.config.default_max_new_tokens if body.max_new_tokens is None else body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=tuple(body.stop), logprobs=body.logprobs,
        request_id=new_id("gen"), extras=body.sampling_extras())
    tracked = TrackedStream(served, state.metrics, engine_request)
    try:
        head = await until_disconnected(request, tracked.until_first_token())
        if (error := error_of(head[-1])) is not None:
            raise error
        if not body.stream:
            collected = await until_disconnected(request, tracked.collect(head))
            if (error := error_of(collected.last)) is not None:
                raise error
    except BaseException:
        await tracked.aclose()
        raise
    if body.stream:
        return EventStreamResponse(_events(tracked, head), on_close=tracked.aclose, headers=tracked.timing_headers())
    result = {"id": tracked.request_id, "adapter_id": body.adapter_id, "adapter_version": tracked.adapter_version,
              "text": collected.text, "token_ids": collected.token_ids, "finish_reason": tracked.finish_reason,
              "usage": _usage(tracked)}
    if collected.logprobs is not None:
        result["logprobs"] = _logprobs_body(collected.logprobs)
    return JSONResponse(result, headers=tracked.timing_headers())


async def _events(tracked: TrackedStream, head: list[RequestDelta]) -> AsyncIterator[bytes]:
    async def deltas() -> AsyncIterator[RequestDelta]:
        for delta in head:
            yield delta
        async for delta in tracked:
            yield delta

    async for delta in deltas():
        event = {"id": tracked.request_id, "text": delta.text, "token_ids": delta.token_ids}
        if delta.logprobs is not None:
            event["logprobs"] = _logprobs_body(delta.logprobs)
        if delta.is_finished:
            event.update(finish_reason=delta.finish_reason, adapter_id=tracked.request.adapter_id,
                         adapter_version=tracked.adapter_version, usage=_usage(tracked))
            if delta.error:
                event["error"] = {"type": "server_error", "message": delta.error}
        elif not delta.text and not delta.token_ids:
            continue
        yield sse_event(event)


def _usage(tracked: TrackedStream) -> dict[str, int]:
    return {"prompt_tokens": tracked.num_prompt_tokens, "completion_tokens": tracked.num_generated_tokens}


def _logprobs_body(logprobs: list[TokenLogprob]) -> list[dict]:
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(pair) for pair in lp.top]}
            for lp in logprobs]
