"""The path parameters that name an adapter, checked against the store's one id rule (`check_id`) before any route
runs: `{adapter_id}` (/v1/adapters/{adapter_id}, .../merge) and `{model}` (/v1/models/{model}: the base model's name,
or an adapter id). app.py adds this dependency to every router, so a route added later is covered too."""

from fastapi import Request

from lora_server.adapters_store.upload import check_id
from lora_server.api.deps import StateDep

ADAPTER_ID_PARAM = "adapter_id"
MODEL_PARAM = "model"


async def check_path_ids(request: Request, state: StateDep) -> None:
    """AdapterError (a 400 naming the parameter) for a malformed id."""
    params = request.path_params
    if ADAPTER_ID_PARAM in params:
        check_id(params[ADAPTER_ID_PARAM], ADAPTER_ID_PARAM)
    if MODEL_PARAM in params and params[MODEL_PARAM] != state.require_served().model_name:
        check_id(params[MODEL_PARAM], MODEL_PARAM)
