"""Combine adapters of the caller's tenant into a new one: `Σ weight·delta` per module (adapters_store.combine).

    linear: exact; the sources' ranks are concatenated, so the result's rank is their sum.
    svd:    the summed delta truncated to `rank`; `relative_error` says how much of it was lost.

Each source is read at its newest version; the result is validated and stored like an upload (`POST` semantics: the
new id must not exist yet). Combining large adapters takes a while, so it runs on a worker thread."""

import asyncio
import logging

from fastapi import APIRouter

from lora_server.adapters_store import AdapterStore, LoraAdapter
from lora_server.adapters_store.combine import METHODS, combine_adapters
from lora_server.adapters_store.upload import check_id
from lora_server.api.auth import require_admin
from lora_server.api.deps import CallerDep, StateDep
from lora_server.api.errors import invalid_request
from lora_server.api.routes_adapters import check_adapter_id, created_body, require_store, store_version
from lora_server.api.schemas import AdapterCombined, CombineRequest

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/adapters/combine", status_code=201, response_model=AdapterCombined,
             summary="Store a new adapter: a weighted sum of the caller's adapters (exact, or truncated by SVD)")
async def combine(body: CombineRequest, state: StateDep, principal: CallerDep) -> dict:
    require_admin(principal)
    served = state.require_served()
    store = require_store(served)
    check_adapter_id(served, principal, body.adapter_id, must_be_new=True)
    for index, source in enumerate(body.sources):  # before any store access
        check_id(source.id, f"sources[{index}].id")
    if body.method not in METHODS:  # before reading any source; combine_adapters checks everything else
        raise invalid_request(f"method must be one of {', '.join(METHODS)}, got {body.method!r}", param="method")
    files, relative_error = await asyncio.to_thread(_combine, store, principal.tenant, body)
    # A result over the store's size limit is an AdapterTooLarge: a 413, as an upload of that file would get.
    record = await store_version(state, served, principal, body.adapter_id, files, must_be_new=True)
    logger.info("tenant %s combined %s (%s) into %s version %d, relative error %.3g", principal.tenant,
                [source.id for source in body.sources], body.method, body.adapter_id, record.version, relative_error)
    return {**created_body(record, served.model_name), "relative_error": relative_error}


def _combine(store: AdapterStore, tenant: str, body: CombineRequest) -> tuple[dict[str, bytes], float]:
    """(PEFT files, relative error). Raises AdapterNotFound for a source the tenant lacks, AdapterError for the rest."""
    sources = [(_read_latest(store, tenant, source.id), source.weight) for source in body.sources]
    return combine_adapters(sources, body.method, body.rank)


def _read_latest(store: AdapterStore, tenant: str, adapter_id: str) -> LoraAdapter:
    record = store.get(tenant, adapter_id)
    with store.held(record):  # a concurrent delete waits until the read is done
        return store.read(record)
