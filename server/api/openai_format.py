"""OpenAI's response objects, as plain dicts: completions, chat completions, their stream chunks, models.

Token strings in logprobs are each token decoded on its own (readable for most tokenizers; a token that is part of a
multi-byte character shows as U+FFFD, with its bytes given where OpenAI's format has a `bytes` field)."""

from collections.abc import Callable

from lora_server.engine.request import TokenLogprob

Decode = Callable[[list[int]], str]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---------------------------------------------------------------- /v1/completions


def completion(response_id: str, created: int, model: str, choices: list[dict], usage_body: dict) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage_body}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(response_id: str, created: int, model: str, choices: list[dict],
                     usage_body: dict | None = None) -> dict:
    chunk = completion(response_id, created, model, choices, usage_body)
    if usage_body is None:
        del chunk["usage"]
    return chunk


def completion_logprobs(logprobs: list[TokenLogprob], decode: Decode, text_offset: int = 0) -> dict:
    """The legacy completions format: parallel lists, top alternatives as {token: logprob}."""
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(text_offset)
        token = decode([lp.token_id])
        tokens.append(token)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{decode([token_id]): logprob for token_id, logprob in lp.top} for lp in logprobs],
            "text_offset": offsets}


# ---------------------------------------------------------------- /v1/chat/completions


def chat_completion(response_id: str, created: int, model: str, choices: list[dict], usage_body: dict) -> dict:
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_body}


def chat_choice(index: int, content: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_chunk(response_id: str, created: int, model: str, choices: list[dict],
               usage_body: dict | None = None) -> dict:
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if usage_body is not None:
        chunk["usage"] = usage_body
    return chunk


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_logprobs(logprobs: list[TokenLogprob], decode: Decode, num_top: int) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token = decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, p) for t, p in lp.top[:num_top]]}
                        for lp in logprobs], "refusal": None}


# ---------------------------------------------------------------- /v1/models


def model_card(model_id: str, created: int, owned_by: str, parent: str | None, root: str) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent,
            "root": root}
