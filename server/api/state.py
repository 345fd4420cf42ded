"""The server's one state object: what it serves once loaded, and its lifecycle (loading -> ready -> draining).

The model loads on a worker thread after the HTTP port is open, so /health and /ready answer during a long load;
requests that need the model get a 503 until then. A stop (SIGTERM) during the load is not a failure: the server stops
serving at once, what the load brings is closed when it ends, and the process exits 0."""

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lora_server.adapters_store import AdapterError, AdapterStore, StoreLocked
from lora_server.api.auth import ApiKeys
from lora_server.api.chat_template import ChatTemplate
from lora_server.api.config import ApiConfig
from lora_server.api.errors import unavailable
from lora_server.api.metrics import ApiMetrics
from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.async_engine import AsyncEngine
from lora_server.engine.engine import EngineStats
from lora_server.model.config import ModelConfigError

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05
ABORTED_FLUSH_S = 2.0  # after aborting what outlived the drain timeout, how long its responses get to end


@dataclass
class Served:
    """A loaded model behind its engine, and the adapter store (None: the base model only)."""

    engine: AsyncEngine
    store: AdapterStore | None
    chat_template: ChatTemplate | None
    loaded_at: float = field(default_factory=time.time)  # Unix seconds: the base model's `created` in /v1/models

    @property
    def model_name(self) -> str:
        return self.engine.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    def close(self) -> None:
        self.engine.shutdown()
        self.engine.engine.close()
        if self.store is not None:
            self.store.close()


Loader = Callable[[], Served]  # runs on a worker thread; returns a started engine


class ServerState:
    def __init__(self, config: ApiConfig, keys: ApiKeys | None, loader: Loader,
                 on_load_failure: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.keys = keys
        self.served: Served | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.num_in_flight = 0  # HTTP requests being handled, not waiting on their client (the middleware counts them)
        self.bodies_cut = asyncio.Event()  # set when a drain ends: bodies still arriving are cut short (a 503)
        self.upload_lock = asyncio.Lock()  # uploads of one server run one at a time (see routes_adapters)
        self.metrics = ApiMetrics(config.metrics_top_adapters, self.engine_stats, self._num_stored_versions)
        self._loader = loader
        self._on_load_failure = on_load_failure
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # between the loader thread handing over what it loaded and close()
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    def start_loading(self) -> None:
        """Load on a thread of its own. Not asyncio.to_thread: the result must reach the state even if the loop has
        stopped meanwhile, so that one side closes it. Not a daemon: a load cannot be interrupted part-way, and tearing
        the interpreter down under it crashes the process (torch's threads), so the process exits once it ends."""
        self._loop = asyncio.get_running_loop()
        self._load_thread = threading.Thread(target=self._load, name="model-loader")
        self._load_thread.start()

    def _load(self) -> None:  # on the loader thread
        started = time.monotonic()
        try:
            served = self._loader()
        except BaseException as error:  # reported, then the server exits
            self.load_error = error
            if self._closed:
                logger.info("loading the model failed after the server stopped: %s", error)
                return
            expected = isinstance(error, ModelConfigError | StoreLocked | AdapterError | OSError | ValueError)
            logger.error("loading the model failed: %s", str(error) or type(error).__name__, exc_info=not expected)
            if self._on_load_failure is not None:
                try:
                    self._loop.call_soon_threadsafe(self._on_load_failure, error)
                except RuntimeError:  # the loop has closed: the server has stopped already
                    pass
            return
        with self._lock:  # either close() sees it, or it sees close(): whoever comes second closes it
            stopped = self._closed
            if not stopped:
                self.served = served
        if stopped:
            served.close()
            logger.info("closed the model that finished loading after the server stopped")
            return
        logger.info("ready: serving %s (loaded in %.1f s)", served.model_name, time.monotonic() - started)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests (503), let those in flight finish for up to `timeout_s`, then abort the rest.
        True when everything finished in time."""
        self.draining = True
        if self.served is not None:
            self.served.engine.stop_accepting()
        logger.info("draining: %d requests in flight, waiting up to %.0f s", self.num_in_flight, timeout_s)
        finished = await self._wait_in_flight(timeout_s)
        if not finished and self.served is not None:
            logger.warning("drain timeout: aborting %d requests still in flight", self.num_in_flight)
            self.served.engine.shutdown()  # every stream gets its last delta ("abort"), so responses can end
            await self._wait_in_flight(ABORTED_FLUSH_S)
        self.bodies_cut.set()  # no one waits for them: a client still sending its body gets a 503 and is closed
        logger.info("drained%s", "" if finished else " (some requests were aborted)")
        return finished

    async def _wait_in_flight(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.num_in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return self.num_in_flight == 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            served, self.served = self.served, None
        if served is not None:
            served.close()
        elif self._load_thread is not None and self._load_thread.is_alive():
            logger.info("stopped while loading the model: the process exits when the load in progress ends (it "
                        "cannot be interrupted part-way)")

    # ---------------------------------------------------------------- for routes

    @property
    def is_ready(self) -> bool:
        return self.served is not None and not self.draining

    def require_served(self) -> Served:
        if self.served is None:
            raise unavailable("the model failed to load" if self.load_error else "the model is still loading")
        return self.served

    def engine_stats(self) -> EngineStats | None:
        return None if self.served is None else self.served.engine.stats()

    def merged_adapter(self) -> AdapterKey | None:
        """The adapter version merged into the base, as of the engine's last step; None when none is."""
        stats = self.engine_stats()
        return None if stats is None or stats.merge is None else stats.merge.merged

    def _num_stored_versions(self) -> int | None:
        if self.served is None or self.served.store is None:
            return None
        return self.served.store.num_versions()
