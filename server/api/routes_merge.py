"""Merged mode on request (`--merge-policy manual`): merge one adapter of the caller's tenant into the base weights, and
unmerge it. Admins only.

While an adapter is merged its requests run with no LoRA term at all (as fast as the base model), and every other
request in the same batch, base-only ones included, still gets exactly its own output (the engine subtracts the merged
delta for them). At most one adapter is merged at a time: merging another of the tenant's adapters unmerges the first.
The switch happens between two engine steps, once the adapter is on the device; `POST` answers when it is done.

A merge changes every tenant's speed, so it is first come, first served across tenants: while one tenant's adapter is
merged (or being merged), another tenant's merge is refused, and the refusal names neither that tenant nor its adapter.
Who may merge at all is the operator's choice: `--merge-policy manual` hands it to the tenants' admins.

Refusals are 409s (code `merge_refused`) naming the reason: the policy is not manual, the adapter is not the merged
one, another tenant's adapter is merged, an NF4 base's dense copies would be over `--merge-budget-bytes`, the adapter
failed to load.
"""

import asyncio
import logging

from fastapi import APIRouter

from lora_server.api.auth import require_admin
from lora_server.api.deps import CallerDep, StateDep
from lora_server.api.routes_adapters import no_adapter, require_store
from lora_server.api.schemas import AdapterMerged, AdapterUnmerged

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/adapters/{adapter_id}/merge", response_model=AdapterMerged,
             summary="Merge the adapter's newest version into the base weights (--merge-policy manual)")
async def merge_adapter(adapter_id: str, state: StateDep, principal: CallerDep) -> dict:
    require_admin(principal)
    served = state.require_served()
    record = require_store(served).get(principal.tenant, adapter_id)  # AdapterNotFound: a 404, whoever owns it
    await asyncio.wrap_future(served.engine.request_merge(principal.tenant, adapter_id))  # MergeRefused: a 409
    logger.info("tenant %s merged adapter %s version %d", principal.tenant, adapter_id, record.version)
    return {"adapter_id": adapter_id, "version": record.version}


@router.delete("/v1/adapters/{adapter_id}/merge", response_model=AdapterUnmerged,
               summary="Unmerge the adapter: the base weights come back bit for bit (--merge-policy manual)")
async def unmerge_adapter(adapter_id: str, state: StateDep, principal: CallerDep) -> dict:
    require_admin(principal)
    served = state.require_served()
    if not require_store(served).versions(principal.tenant, adapter_id):
        raise no_adapter(adapter_id)
    await asyncio.wrap_future(served.engine.request_unmerge(principal.tenant, adapter_id))  # MergeRefused: a 409
    logger.info("tenant %s unmerged adapter %s", principal.tenant, adapter_id)
    return {"adapter_id": adapter_id}
