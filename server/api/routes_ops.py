"""Probes and metrics, without authentication: /health (liveness), /ready (readiness), /metrics (Prometheus).

/health is green only while the engine's step loop makes progress: the loop heartbeats even when idle, so a step that
hangs (a wedged device, a deadlock) turns it red after `health_stall_s`, and an orchestrator restarts the process.
While the model loads, /health is green (the process is working; a startup probe on /ready covers a slow load) and
/ready is red; /ready turns red again when draining, so a load balancer stops sending traffic."""

from typing import Protocol

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from lora_server.api.deps import StateDep
from lora_server.api.errors import SERVER, UNAVAILABLE
from lora_server.api.metrics import CONTENT_TYPE

router = APIRouter()


class ProgressSource(Protocol):
    def seconds_since_progress(self) -> float: ...


def health_of(engine: ProgressSource | None, load_failed: bool, stall_s: float) -> tuple[int, dict]:
    """(status code, body) of /health."""
    if load_failed:
        return 503, {"error": {"type": SERVER, "message": "the model failed to load"}}
    if engine is None:
        return 200, {"status": "loading"}
    idle = engine.seconds_since_progress()
    if idle > stall_s:
        return 503, {"error": {"type": UNAVAILABLE, "message": f"the engine loop has made no progress for "
                                                               f"{idle:.1f} s (the limit is {stall_s:g} s)"}}
    return 200, {"status": "ok", "seconds_since_progress": round(idle, 3)}


@router.get("/health", summary="Liveness: 200 while the engine loop makes progress")
async def health(state: StateDep) -> JSONResponse:
    engine = None if state.served is None else state.served.engine
    status, body = health_of(engine, state.load_error is not None, state.config.health_stall_s)
    return JSONResponse(body, status_code=status)


@router.get("/ready", summary="Readiness: 200 once the model is loaded, until draining starts")
async def ready(state: StateDep) -> JSONResponse:
    if state.is_ready:
        return JSONResponse({"status": "ready", "model": state.served.model_name})
    why = "draining" if state.draining else "failed" if state.load_error else "loading"
    return JSONResponse({"error": {"type": UNAVAILABLE, "message": f"not ready: {why}"}}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics (text format)")
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
