"""The Ray Serve application: an ingress deployment with the single server's whole HTTP API (it forwards every
request), and an engine deployment whose replicas each run a whole single server (engine, API, auth, metrics) in
process, on one shared adapter repository, with a local cache of it per replica.

Routing: the ingress reads which adapter a request names (routing.multiplex_key: `tenant/adapter_id`) and passes it as
Ray Serve's multiplexed model id, so requests for an adapter go to a replica where it is already resident; a replica
reports what it holds through `serve.multiplexed`. The base model is loaded once per replica and never reloaded: the
"models" multiplexed are adapters, whose residency the engine itself manages. Responses stream through the ingress
chunk by chunk and name the replica that served them in REPLICA_HEADER.

Failure: a request whose replica died before answering is sent once more when that is safe (routing.is_retryable); a
stream cut mid-way ends with an SSE error event. Metrics: each replica publishes its own to the ReplicaMetrics board,
and the ingress's /metrics serves them all, labelled by replica (replica_metrics.py)."""

import argparse
import asyncio
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from lora_server.adapters_store import StoreLimits
from lora_server.api import sse
from lora_server.api.app import create_app
from lora_server.api.auth import DEFAULT_TENANT, ApiKeys
from lora_server.api.config import ApiConfig
from lora_server.api.loading import ServeTarget, open_served
from lora_server.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lora_server.api.serve import add_serve_arguments, engine_options
from lora_server.cluster.asgi_call import ForwardedRequest, call_asgi
from lora_server.cluster.replica_metrics import PUBLISH_INTERVAL_S, MetricsBoard, merge_replica_metrics
from lora_server.cluster.routing import is_retryable, multiplex_key

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-lora-replica"
MAX_ADAPTERS_PER_REPLICA = 64  # what the router counts as warm on a replica; the engine's own residency decides more
LOAD_POLL_S = 0.05
MAX_RETRIES = 1  # one replica dying is the failure this covers; a request that kills replicas should not kill two


def parse_serve_argv(serve_argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-server serve-cluster")
    add_serve_arguments(parser)
    return parser.parse_args(serve_argv)


def _replica_app(args: argparse.Namespace, cache_dir: Path) -> FastAPI:
    """The single server's app, built as `serve` builds it (api/serve.py's run_serve), on the repository."""
    config = ApiConfig(max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes,
                       max_new_tokens_limit=args.max_new_tokens_limit,
                       default_max_new_tokens=args.default_max_new_tokens, drain_timeout_s=args.drain_timeout,
                       max_prompts_per_request=args.max_prompts_per_request, health_stall_s=args.health_stall_seconds,
                       metrics_top_adapters=args.metrics_top_adapters, header_timeout_s=args.header_timeout,
                       body_timeout_s=args.body_timeout)
    keys = None if args.api_keys is None else ApiKeys.load(args.api_keys)
    target = ServeTarget(model_dir=args.model, model_name=args.served_model_name, store_dir=cache_dir,
                         repository_dir=args.adapter_repository, engine_options=engine_options(args),
                         store_limits=StoreLimits(max_file_bytes=args.max_upload_bytes, max_rank=args.max_lora_rank),
                         max_pending=args.max_pending, max_pending_per_tenant=args.max_pending_per_tenant,
                         tenants=tuple(keys.tenants) if keys else (DEFAULT_TENANT,))
    return create_app(config, keys, lambda: open_served(target))


# No access log: every replica publishes every couple of seconds, which would drown the log.
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class ReplicaMetrics:
    """The metrics board (replica_metrics.py) as a deployment: replicas publish to it, the ingress's /metrics reads it.
    One replica: the board is a few kilobytes per engine replica, and losing it loses one publish interval."""

    def __init__(self) -> None:
        self.board = MetricsBoard()

    async def publish(self, replica: str, text: str) -> None:  # async: every call on the one event loop, no locks
        self.board.publish(replica, text, time.monotonic())

    async def current(self) -> dict[str, str]:
        return self.board.current(time.monotonic())


@serve.deployment(max_ongoing_requests=256)
class EngineReplica:
    async def __init__(self, serve_argv: list[str], metrics: DeploymentHandle) -> None:
        args = parse_serve_argv(serve_argv)
        assert args.adapter_repository is not None, "serve-cluster checks --adapter-repository"
        self.name = serve.get_replica_context().replica_id.unique_id
        # Each replica's own cache of the repository: replicas share nothing but the repository. Its name says whose.
        self.cache_dir = Path(tempfile.mkdtemp(prefix=f"lora-server-replica-{self.name}-"))
        self.app = _replica_app(args, self.cache_dir)
        # The model loads here, before Ray routes anything to this replica: a restarted replica joins ready.
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        state = self.app.state.server
        while state.served is None:
            if state.load_error is not None:
                raise RuntimeError(f"replica {self.name} failed to load: {state.load_error}")
            await asyncio.sleep(LOAD_POLL_S)
        self._metrics = metrics
        self._publisher = asyncio.create_task(self._publish_metrics())
        logger.info("replica %s ready (cache %s)", self.name, self.cache_dir)

    async def _publish_metrics(self) -> None:
        while True:
            try:
                await self._metrics.publish.remote(self.name, self.app.state.server.metrics.render().decode())
            except Exception as error:  # the board restarting: the next publish reaches its successor
                logger.warning("replica %s could not publish its metrics: %s", self.name, error)
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine stopped is restarted."""
        if self.app.state.server.load_error is not None:
            raise RuntimeError(f"model load failed: {self.app.state.server.load_error}")
        if self._publisher.done():
            raise RuntimeError(f"metrics publisher stopped: {self._publisher}")

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def adapter(self, model_id: str) -> str:
        # Nothing to load here: the engine loads an adapter on its first request. Registering the id tells Ray's
        # router that this replica has it warm, so the next request for it comes here.
        return model_id

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[object]:
        """The request through this replica's server: (status, headers) first, then body chunks as they are sent."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.adapter(model_id)
        first = True
        async for item in call_asgi(self.app, request):
            if first:
                status, headers = item
                item, first = (status, [*headers, (REPLICA_HEADER.encode(), self.name.encode())]), False
            yield item


def build_ingress(keys_path: Path | None) -> type:
    api = FastAPI(title="lora-server (Ray Serve ingress)", openapi_url=None, docs_url=None, redoc_url=None)

    @serve.deployment(max_ongoing_requests=1024)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, engine: DeploymentHandle, metrics: DeploymentHandle) -> None:
            self.engine = engine
            self.metrics = metrics
            self.keys = None if keys_path is None else ApiKeys.load(keys_path)

        @api.get("/metrics", include_in_schema=False)
        async def replica_metrics(self) -> Response:
            """Every replica's metrics, each series labelled replica="<name>" (see replica_metrics.py)."""
            texts = await self.metrics.current.remote()
            return Response(merge_replica_metrics(texts), media_type=METRICS_CONTENT_TYPE)

        @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"],
                       include_in_schema=False)
        async def forward(self, path: str, request: Request):
            body = await request.body()
            key = multiplex_key(request.method, request.url.path, request.headers.get("authorization", ""), body,
                                self.keys)
            handle = self.engine.options(stream=True, multiplexed_model_id=key)
            forwarded = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                                         [(k.lower(), v) for k, v in request.headers.raw], body)
            # A replica that dies before answering has sent nothing: a read or a generation goes once more, to
            # another replica (Ray's router drops a dead replica at once); a write is the client's to retry.
            num_tries = 1 + (MAX_RETRIES if is_retryable(request.method, request.url.path) else 0)
            for attempt in range(1, num_tries + 1):
                stream = handle.forward.remote(forwarded)
                try:
                    status, headers = await stream.__anext__()
                    break
                except Exception as error:
                    logger.warning("replica failed before answering %s %s (try %d of %d): %s", request.method,
                                   request.url.path, attempt, num_tries, error)
            else:
                return JSONResponse({"error": {"message": "the replica serving this request failed before answering; "
                                               "retry it", "type": "server_error", "code": "replica_failed"}},
                                    status_code=503, headers={"Retry-After": "1"})
            is_event_stream = any(k.lower() == b"content-type" and v.startswith(sse.MEDIA_TYPE.encode())
                                  for k, v in headers)
            response = StreamingResponse(_rest(stream, request.url.path, is_event_stream), status_code=status)
            response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            return response

    return Ingress


async def _rest(stream, path: str, is_event_stream: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    except Exception as error:  # mid-stream: the status is sent, so the stream ends short, and says so
        logger.warning("replica failed mid-response on %s: %s", path, error)
        if is_event_stream:  # an event the client reads as the end, as a single server's mid-stream error
            yield sse.sse_event({"error": {"message": "the replica serving this request failed mid-stream",
                                           "type": "server_error", "code": "replica_failed"}})


def build_application(serve_argv: list[str], num_replicas: int, num_gpus: float, num_cpus: float,
                      autoscaling: dict | None = None):
    """The bound application `serve.run` takes: the ingress in front of the engine replicas."""
    args = parse_serve_argv(serve_argv)
    options: dict = {"ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus}}
    options.update({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas})
    metrics = ReplicaMetrics.bind()
    engine = EngineReplica.options(**options).bind(serve_argv, metrics)
    return build_ingress(args.api_keys).bind(engine, metrics)
