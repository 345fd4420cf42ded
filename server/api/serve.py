"""`lora-server serve`: the HTTP server (uvicorn) around the engine.

    lora-server serve                                  # the embedded demo on 127.0.0.1:8000, open (no keys)
    lora-server serve --model DIR --api-keys keys.json --quantize nf4 --store /var/lib/lora-server

SIGTERM or SIGINT drains: new requests get 503 (and /ready turns red) while those in flight finish, for up to
--drain-timeout seconds; then the rest are aborted and the process exits 0. A second signal exits at once, and so does
a first one while the model is still loading (0: a stop is not a failure).

Slow clients: a request's headers must arrive within --header-timeout seconds (of the connection opening, or of the
request's first byte on a kept-alive connection), and its whole body within --body-timeout seconds after them; a slower
client gets a JSON 408 and its connection is closed. A request waiting on its client for its body does not hold a
drain: when the drain ends, a body still arriving is cut short with a 503.
"""

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from prometheus_client import disable_created_metrics

from lora_server.adapters_store import StoreLimits
from lora_server.api.adapter_dirs import parse_lora_module
from lora_server.api.app import create_app
from lora_server.api.auth import DEFAULT_TENANT, ApiKeys, ApiKeysError
from lora_server.api.cli_options import (
    PROBE_PATHS,
    HelpFormatter,
    add_logging_arguments,
    configure_logging,
    skip_access_log_paths,
)
from lora_server.api.config import ApiConfig
from lora_server.api.header_timeout import with_header_timeout
from lora_server.api.loading import ServeTarget, open_served
from lora_server.api.state import ServerState
from lora_server.engine.build import EngineOptions
from lora_server.engine.merging.control import MERGE_MODES
from lora_server.kernels.lora_ops import LORA_BACKENDS
from lora_server.model.cuda_graphs import CUDA_GRAPH_SETTINGS, resolve_cuda_graphs
from lora_server.model.loader import resolve_device
from lora_server.model.paged_cache import ATTENTION_BACKENDS

logger = logging.getLogger(__name__)

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
              "g": 10**9, "gb": 10**9, "gib": 2**30}
GRACEFUL_CLOSE_S = 5  # after the drain, how long uvicorn waits for connections to close


def default_store_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "lora-server" / "store"


def byte_size(text: str) -> int:
    """`1048576`, `512MiB`, `2GB`, `64k`: a positive number of bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 1048576, 64KiB, 512MiB or 2GB, got {text!r}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def add_serve_parser(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subcommands.add_parser("serve", help="serve the HTTP API (OpenAI-compatible routes, adapter uploads)",
                                    description=__doc__, formatter_class=HelpFormatter)
    add_serve_arguments(parser)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ApiConfig()
    model = parser.add_argument_group("model and engine")
    model.add_argument("--model", type=Path, default=None,
                       help="Hugging Face checkpoint directory (default: the embedded demo model)")
    model.add_argument("--served-model-name", default=None,
                       help="the base model's name in the API (default: the directory's name; 'demo' for the demo)")
    model.add_argument("--quantize", choices=["none", "nf4"], default="none")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    model.add_argument("--lora-backend", choices=list(LORA_BACKENDS), default="auto")
    model.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default="auto",
                       help="paged attention: Triton kernels reading the cache in place (auto: on CUDA) or torch")
    model.add_argument("--cuda-graphs", choices=list(CUDA_GRAPH_SETTINGS), default="auto",
                       help="replay decode steps from CUDA graphs captured at startup (auto: on CUDA; on: refused "
                            "elsewhere)")
    model.add_argument("--compile", action="store_true",
                       help="decode steps through torch.compile (slower on CPU; the first steps compile)")
    model.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch")
    model.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one forward pass")
    model.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    model.add_argument("--kv-cache-bytes", type=byte_size, default=None)
    model.add_argument("--max-adapters-on-device", type=int, default=32, help="adapter slots: distinct adapters "
                                                                              "one batch can mix")
    model.add_argument("--max-lora-rank", type=int, default=64, help="the device pool is sized for this rank")
    model.add_argument("--adapter-host-bytes", type=byte_size, default=2 << 30, help="host cache of parsed adapters")
    add_merge_arguments(parser)

    adapters = parser.add_argument_group("adapters from directories (as vLLM's flags)")
    adapters.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                          help="store each adapter directory at startup as adapter NAME (for every tenant), validated "
                               "as an upload is; a restart with the same files adds no version")
    adapters.add_argument("--adapter-dirs-allowed", nargs="+", action="extend", type=Path, default=[], metavar="DIR",
                          help="POST /v1/load_lora_adapter (and /v1/unload_lora_adapter) are allowed, for admin keys, "
                               "with adapters under these directories (default: none, both routes are 403)")

    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--store", type=Path, default=None,
                      help=f"adapter store directory (default: {default_store_dir()})")
    http.add_argument("--adapter-repository", type=Path, default=None,
                      help="a shared adapter repository (a directory on a shared filesystem) that several servers "
                           "read and upload to; --store is then this server's cache of it (see deploy/CLUSTER.md)")
    http.add_argument("--api-keys", type=Path, default=None,
                      help='JSON {"keys": [{"key", "tenant", "role": "admin"|"user"}]}; without it the server is open')
    http.add_argument("--max-pending", type=int, default=1024,
                      help="requests queued or running at once; more get 429 with Retry-After")
    http.add_argument("--max-pending-per-tenant", type=int, default=None,
                      help="the same for each tenant's own requests (default: --max-pending when the server has one "
                           "tenant, half of it when it has several, so no tenant can lock the others out)")
    http.add_argument("--max-prompts-per-request", type=int, default=defaults.max_prompts_per_request,
                      help="prompts in one /v1/completions request (each is queued as its own request)")
    http.add_argument("--max-body-bytes", type=byte_size, default=defaults.max_body_bytes)
    http.add_argument("--max-upload-bytes", type=byte_size, default=defaults.max_upload_bytes,
                      help="per adapter file")
    http.add_argument("--max-new-tokens-limit", type=int, default=defaults.max_new_tokens_limit)
    http.add_argument("--default-max-new-tokens", type=int, default=defaults.default_max_new_tokens,
                      help="for /v1/generate requests that give none")
    http.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout_s,
                      help="seconds in-flight requests get to finish after SIGTERM")
    http.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                      help="seconds a client gets to send a request's headers; slower gets 408 and a closed connection")
    http.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                      help="seconds a client gets to send a request's whole body after its headers (raise it for big "
                           "adapter uploads over slow links); slower gets 408 and a closed connection")
    http.add_argument("--health-stall-seconds", type=float, default=defaults.health_stall_s,
                      help="/health turns red when the engine loop has made no progress for this long")
    http.add_argument("--metrics-top-adapters", type=int, default=defaults.metrics_top_adapters,
                      help="adapters with their own metric series (the rest are summed as 'other')")
    http.add_argument("--no-access-log", action="store_true")
    http.add_argument("--access-log-skip", nargs="*", default=list(PROBE_PATHS), metavar="PATH",
                      help="paths whose requests the access log leaves out (give none to log every request)")
    add_logging_arguments(parser)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    engine = EngineOptions()
    merge = parser.add_argument_group("merged mode", "one adapter merged into the base weights: its requests run at "
                                                     "the base model's speed, every other request stays exact")
    merge.add_argument("--merge-policy", choices=list(MERGE_MODES), default=engine.merge_policy,
                       help="off: never merge; manual: POST/DELETE /v1/adapters/{id}/merge; auto: merge an adapter "
                            "that dominates the batched tokens")
    merge.add_argument("--merge-window-steps", type=int, default=engine.merge_window_steps,
                       help="auto: the engine steps whose tokens decide")
    merge.add_argument("--merge-share", type=float, default=engine.merge_share,
                       help="auto: merge an adapter with at least this share of the window's tokens")
    merge.add_argument("--unmerge-share", type=float, default=engine.unmerge_share,
                       help="auto: unmerge when the merged adapter's share falls below this")
    merge.add_argument("--merge-min-steps-between-switches", type=int,
                       default=engine.merge_min_steps_between_switches, help="auto: steps between two switches")
    merge.add_argument("--merge-budget-bytes", type=byte_size, default=engine.merge_budget_bytes,
                       help="an NF4 base: device bytes for the dense copies of merged layers (default: no cap)")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The engine's options from the flags; ValueError for a bad combination (before anything loads)."""
    options = EngineOptions(device=args.device, dtype=args.dtype, quantize=args.quantize,
                            lora_backend=args.lora_backend, attention_backend=args.attention_backend,
                            cuda_graphs=args.cuda_graphs, compile=args.compile, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                            kv_cache_bytes=args.kv_cache_bytes, max_adapters_on_device=args.max_adapters_on_device,
                            max_lora_rank=args.max_lora_rank, adapter_host_bytes=args.adapter_host_bytes,
                            merge_policy=args.merge_policy, merge_window_steps=args.merge_window_steps,
                            merge_share=args.merge_share, unmerge_share=args.unmerge_share,
                            merge_min_steps_between_switches=args.merge_min_steps_between_switches,
                            merge_budget_bytes=args.merge_budget_bytes)
    _ = options.merge_policy_config  # checks the auto policy's numbers now, rather than after the model has loaded
    resolve_cuda_graphs(options.cuda_graphs, resolve_device(options.device))  # likewise: "on" without CUDA
    return options


def run_serve(args: argparse.Namespace) -> int:
    """Serve until drained; the process's exit status (0 after a SIGTERM drain)."""
    try:
        config = ApiConfig(max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes,
                           max_new_tokens_limit=args.max_new_tokens_limit,
                           default_max_new_tokens=args.default_max_new_tokens, drain_timeout_s=args.drain_timeout,
                           max_prompts_per_request=args.max_prompts_per_request,
                           health_stall_s=args.health_stall_seconds, metrics_top_adapters=args.metrics_top_adapters,
                           header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                           # resolved once: the routes compare resolved paths against them
                           adapter_dirs_allowed=tuple(d.resolve() for d in args.adapter_dirs_allowed))
        keys = None if args.api_keys is None else ApiKeys.load(args.api_keys)
        options = engine_options(args)
        store_limits = StoreLimits(max_file_bytes=args.max_upload_bytes, max_rank=args.max_lora_rank)
        if args.max_pending < 1 or (args.max_pending_per_tenant is not None and args.max_pending_per_tenant < 1):
            raise ValueError("--max-pending and --max-pending-per-tenant must be positive")
        if args.model is not None and not (args.model / "config.json").is_file():
            raise ValueError(f"--model {args.model}: not a checkpoint directory (it has no config.json)")
        lora_modules = tuple(parse_lora_module(spec) for spec in args.lora_modules)
        for name, path in lora_modules:
            if not path.is_dir():
                raise ValueError(f"--lora-modules {name}={path}: not a directory")
        for directory in args.adapter_dirs_allowed:
            if not directory.is_dir():
                raise ValueError(f"--adapter-dirs-allowed {directory}: not a directory")
    except (ValueError, ApiKeysError) as error:
        logger.error("%s", error)
        return 2
    if keys is None:
        logger.warning("no --api-keys: the server is OPEN, single-tenant (%r), and every caller is its admin",
                       DEFAULT_TENANT)
    else:
        logger.info("API keys for tenants %s", keys.tenants)
    target = ServeTarget(model_dir=args.model, model_name=args.served_model_name,
                         store_dir=args.store or default_store_dir(), repository_dir=args.adapter_repository,
                         engine_options=options,
                         store_limits=store_limits, max_pending=args.max_pending,
                         max_pending_per_tenant=args.max_pending_per_tenant,
                         tenants=tuple(keys.tenants) if keys else (DEFAULT_TENANT,), lora_modules=lora_modules)
    skip_access_log_paths(args.access_log_skip)

    disable_created_metrics()  # no `_created` twin for every counter: half the lines, nothing Prometheus needs
    failure: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_failure(error: BaseException) -> None:
        failure.append(error)
        assert server is not None
        server.should_exit = True

    app = create_app(config, keys, lambda: open_served(target), on_load_failure)
    # h11 always (never httptools, if installed): the header timeout is a subclass of uvicorn's h11 protocol.
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                                    access_log=not args.no_access_log, timeout_graceful_shutdown=GRACEFUL_CLOSE_S,
                                    http=with_header_timeout(config.header_timeout_s))
    server = DrainingServer(uvicorn_config, app.state.server)
    server.run()
    return 1 if failure else 0


class DrainingServer(uvicorn.Server):
    """uvicorn, but a first SIGTERM/SIGINT drains (503s, in-flight requests finish) instead of closing the listening
    socket at once; and the signal is not re-raised afterwards, so the process exits 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None  # held so the task is not garbage-collected mid-drain

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self._drain_requested:
            logger.info("%s again: stopping now", name)
            self.force_exit = True
        elif self._loop is None or self.state.served is None:
            # Not started, still loading, or the load failed: nothing to drain. The load's thread is left behind.
            logger.info("%s before the model was loaded: stopping now", name)
        else:
            self._drain_requested = True
            logger.info("%s: draining (up to %.0f s)", name, self.state.config.drain_timeout_s)
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        self.should_exit = True

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.state.drain(self.state.config.drain_timeout_s)
        finally:
            self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_server.api.serve", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    sys.exit(run_serve(args))


if __name__ == "__main__":
    main()
