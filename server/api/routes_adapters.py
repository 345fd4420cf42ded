"""Adapters of the caller's tenant: upload (POST a new one, PUT a new version: hot-swap), list, inspect, delete.

An upload is a multipart form: text field `adapter_id` (POST), file fields `adapter_config` (adapter_config.json) and
`adapter_model` (adapter_model.safetensors). The store validates it fully against the base model before anything is
written. New requests pin the newest version when submitted; requests already running finish on theirs.

Uploads of one server run one at a time (an asyncio lock): they are rare, and it makes POST's "must not exist yet"
check and the write one step."""

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from lora_server.adapters_store import AdapterError, AdapterStore, AdapterVersion
from lora_server.adapters_store.peft_adapter import WEIGHTS_FILE
from lora_server.adapters_store.peft_config import CONFIG_FILE
from lora_server.adapters_store.repository import AdapterExists
from lora_server.adapters_store.upload import check_id
from lora_server.api.auth import Principal, require_admin
from lora_server.api.deps import CallerDep, StateDep
from lora_server.api.errors import CONFLICT, TOO_LARGE, ApiError, api_error_from, invalid_request, not_found
from lora_server.api.schemas import (
    AdapterCreated,
    AdapterDeleted,
    AdapterDetail,
    AdapterIdText,
    AdapterList,
    AdapterSummary,
)
from lora_server.api.state import Served, ServerState
from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.merging.control import MergeRefused

logger = logging.getLogger(__name__)
router = APIRouter()

ConfigFile = Annotated[UploadFile, File(description="adapter_config.json")]
ModelFile = Annotated[UploadFile, File(description="adapter_model.safetensors")]
UPLOAD_RESULT_OF_STATUS = {201: "success", 400: "invalid", 413: "too_large", 409: "conflict"}


@router.post("/v1/adapters", status_code=201, response_model=AdapterCreated, summary="Upload a new adapter")
async def create_adapter(adapter_id: Annotated[AdapterIdText, Form()], adapter_config: ConfigFile,
                         adapter_model: ModelFile, state: StateDep, principal: CallerDep) -> dict:
    return await _upload(state, principal, adapter_id, adapter_config, adapter_model, must_be_new=True)


@router.put("/v1/adapters/{adapter_id}", status_code=201, response_model=AdapterCreated,
            summary="Store a new version of an adapter (created if missing); new requests use it at once")
async def put_adapter(adapter_id: str, adapter_config: ConfigFile, adapter_model: ModelFile, state: StateDep,
                      principal: CallerDep,
                      form_adapter_id: Annotated[AdapterIdText | None, Form(alias="adapter_id")] = None) -> dict:
    if form_adapter_id is not None and form_adapter_id != adapter_id:
        raise invalid_request(f"the form's adapter_id {form_adapter_id!r} differs from the path's {adapter_id!r}",
                              param="adapter_id")
    return await _upload(state, principal, adapter_id, adapter_config, adapter_model, must_be_new=False)


@router.get("/v1/adapters", response_model=AdapterList, summary="The caller's adapters, each at its latest version")
async def list_adapters(state: StateDep,
                        principal: CallerDep) -> dict:
    served = state.require_served()
    records = require_store(served).list_adapters(principal.tenant)
    return {"object": "list", "data": [_summary(record, served.model_name) for record in records]}


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterDetail,
            summary="An adapter's versions, where it sits now, and the requests it has served")
async def get_adapter(adapter_id: str, state: StateDep,
                      principal: CallerDep) -> dict:
    served = state.require_served()
    versions = require_store(served).versions(principal.tenant, adapter_id)
    if not versions:
        raise no_adapter(adapter_id)
    served_by_version = state.metrics.adapter_traffic.served(principal.tenant, adapter_id)
    return {"id": adapter_id, "parent": served.model_name, "current_version": versions[-1].version,
            "versions": [_version_body(record) for record in versions],
            "tier": served.engine.adapter_tier(principal.tenant, adapter_id),
            "merged": is_merged(state, principal.tenant, adapter_id),
            "requests_served": sum(served_by_version.values()),
            "requests_served_by_version": {int(v): n for v, n in served_by_version.items() if isinstance(v, int)}}


@router.delete("/v1/adapters/{adapter_id}", response_model=AdapterDeleted,
               summary="Delete every version; requests already running finish first")
async def delete_adapter(adapter_id: str, state: StateDep,
                         principal: CallerDep) -> dict:
    require_admin(principal)
    served = state.require_served()
    store = require_store(served)
    deleted = await asyncio.to_thread(store.delete, principal.tenant, adapter_id)  # AdapterNotFound: a 404
    served.engine.retire_adapter(principal.tenant, adapter_id)
    if is_merged(state, principal.tenant, adapter_id):
        await _unmerge_deleted(served, principal.tenant, adapter_id)
    logger.info("tenant %s deleted adapter %s (versions %s)", principal.tenant, adapter_id,
                [record.version for record in deleted])
    return {"id": adapter_id, "versions": sorted(record.version for record in deleted)}


# ---------------------------------------------------------------- helpers


async def _upload(state: ServerState, principal: Principal, adapter_id: str, config_file: UploadFile,
                  weights_file: UploadFile, must_be_new: bool) -> dict:
    require_admin(principal)
    served = state.require_served()
    store = require_store(served)
    try:
        check_adapter_id(served, principal, adapter_id, must_be_new)
        files = {CONFIG_FILE: await _read_within(config_file, store.limits.max_config_bytes, "adapter_config"),
                 WEIGHTS_FILE: await _read_within(weights_file, store.limits.max_file_bytes, "adapter_model")}
        record = await store_version(state, served, principal, adapter_id, files, must_be_new)
    except (ApiError, AdapterError) as error:
        status = api_error_from(error).status
        state.metrics.uploads.labels(UPLOAD_RESULT_OF_STATUS.get(status, "error")).inc()
        raise
    except Exception:
        state.metrics.uploads.labels("error").inc()
        raise
    state.metrics.uploads.labels("success").inc()
    return created_body(record, served.model_name)


def check_adapter_id(served: Served, principal: Principal, adapter_id: str, must_be_new: bool) -> None:
    """Refuse, before any work, a new adapter's id that is malformed or names the base model (400) or, for POST,
    exists (409)."""
    check_id(adapter_id, "adapter_id")
    if adapter_id == served.model_name:
        raise invalid_request(f"adapter_id {adapter_id!r} is the base model's name, which means no adapter",
                              param="adapter_id")
    if must_be_new and require_store(served).versions(principal.tenant, adapter_id):
        raise _exists(adapter_id)


async def store_version(state: ServerState, served: Served, principal: Principal, adapter_id: str,
                        files: dict[str, bytes], must_be_new: bool) -> AdapterVersion:
    """Validate and store the files as the adapter's next version (its first, if `must_be_new`: else a 409), and hand
    the adapter, as parsed to validate it, to the engine's host cache: its first request need not parse it again."""
    store = require_store(served)
    async with state.upload_lock:  # makes "must not exist yet" and the write one step
        if must_be_new and store.versions(principal.tenant, adapter_id):
            raise _exists(adapter_id)
        try:
            record, adapter = await asyncio.to_thread(store.put_parsed, principal.tenant, adapter_id, files,
                                                      must_be_new)
        except AdapterExists:  # on a shared repository: another server created it since our check
            raise _exists(adapter_id) from None
    served.engine.put_uploaded_adapter(AdapterKey(principal.tenant, adapter_id, record.version), adapter)
    return record


def created_body(record: AdapterVersion, parent: str) -> dict:
    return {"id": record.adapter_id, "version": record.version, "sha256": record.sha256, "ranks": list(record.ranks),
            "num_bytes": record.num_bytes, "created_at": record.created_at, "parent": parent}


def is_merged(state: ServerState, tenant: str, adapter_id: str) -> bool:
    """Whether (any version of) the adapter is merged into the base, as of the engine's last step."""
    merged = state.merged_adapter()
    return merged is not None and merged.lineage == (tenant, adapter_id)


async def _unmerge_deleted(served: Served, tenant: str, adapter_id: str) -> None:
    # A deleted adapter can no longer be asked for, so it should not stay merged. Only the manual policy takes
    # requests to unmerge; the auto policy unmerges it by itself once its traffic is gone.
    try:
        await asyncio.wrap_future(served.engine.request_unmerge(tenant, adapter_id))
    except MergeRefused as error:
        logger.info("deleted adapter %s/%s stays merged for now: %s", tenant, adapter_id, error)


async def _read_within(upload: UploadFile, limit: int, field: str) -> bytes:
    if upload.size is not None and upload.size > limit:
        raise ApiError(413, TOO_LARGE, f"{field}: {upload.size} bytes is over this server's limit of {limit} bytes",
                       param=field)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, TOO_LARGE, f"{field}: over this server's limit of {limit} bytes", param=field)
    return data


def require_store(served: Served) -> AdapterStore:
    if served.store is None:
        raise invalid_request("this server was started without an adapter store: it serves the base model only")
    return served.store


def no_adapter(adapter_id: str) -> ApiError:
    return not_found(f"no adapter {adapter_id!r}")


def _exists(adapter_id: str) -> ApiError:
    return ApiError(409, CONFLICT, f"adapter {adapter_id!r} already exists: PUT /v1/adapters/{adapter_id} stores a new "
                                   "version", code="adapter_exists")


def _version_body(record: AdapterVersion) -> dict:
    return {"version": record.version, "sha256": record.sha256, "ranks": list(record.ranks),
            "num_bytes": record.num_bytes, "created_at": record.created_at, "state": record.state}


def _summary(record: AdapterVersion, parent: str) -> AdapterSummary:
    return AdapterSummary(id=record.adapter_id, **_version_body(record), parent=parent)
