"""Open what the server serves: the adapter store, the engine on the model, its async loop, the chat template.

Without a model directory it is the embedded demo, and a store with no adapters for the demo model gets the four demo
adapters (for every tenant the key file names), so the first request can already use one."""

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lora_server.adapters_store import READY, AdapterStore, StoreLimits
from lora_server.adapters_store.repository import AdapterRepository
from lora_server.adapters_store.upload import check_id
from lora_server.api.adapter_dirs import is_stored, read_adapter_dir
from lora_server.api.chat_template import ChatTemplate
from lora_server.api.state import Served
from lora_server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from lora_server.engine.async_engine import AsyncEngine
from lora_server.engine.build import EngineOptions, base_description, open_engine

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class ServeTarget:
    model_dir: Path | None  # None: the embedded demo
    model_name: str | None  # None: "demo" for the demo, else the directory's name
    store_dir: Path
    engine_options: EngineOptions
    store_limits: StoreLimits
    max_pending: int
    tenants: tuple[str, ...]  # whose store gets the demo adapters; with several, each gets a bounded share
    max_pending_per_tenant: int | None = None  # None: see resolved_max_pending_per_tenant
    repository_dir: Path | None = None  # a shared adapter repository, store_dir then its cache; None: no repository
    lora_modules: tuple[tuple[str, Path], ...] = ()  # --lora-modules: (adapter id, directory), stored for each tenant

    @property
    def resolved_model_dir(self) -> Path:
        return DEMO_MODEL_DIR if self.model_dir is None else Path(self.model_dir)

    @property
    def resolved_max_pending_per_tenant(self) -> int:
        """The given bound, else all of max_pending for a lone tenant (an open server) and half of it for several:
        no tenant can then fill the queue and lock the others out, yet one busy tenant still gets most of it."""
        if self.max_pending_per_tenant is not None:
            return self.max_pending_per_tenant
        return self.max_pending if len(self.tenants) <= 1 else max(1, self.max_pending // 2)

    @property
    def resolved_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return DEMO_MODEL_NAME if self.model_dir is None else self.resolved_model_dir.resolve().name


def open_served(target: ServeTarget) -> Served:
    model_dir, name = target.resolved_model_dir, target.resolved_model_name
    repository = None if target.repository_dir is None else AdapterRepository.open(target.repository_dir)
    store = AdapterStore.open(target.store_dir, base_description(model_dir, name), target.store_limits,
                              repository=repository)
    try:
        logger.info("adapter store %s opened (%d servable versions); recovery: %s", target.store_dir,
                    store.num_versions(), store.recovery)
        if target.model_dir is None:
            register_demo_adapters(store, target.tenants)
        register_lora_modules(store, target.tenants, target.lora_modules)
        engine = open_engine(model_dir, store, target.engine_options, model_name=name)
    except BaseException:
        store.close()
        raise
    async_engine = AsyncEngine(engine, max_pending=target.max_pending,
                               max_pending_per_tenant=target.resolved_max_pending_per_tenant)
    async_engine.start()
    return Served(async_engine, store, ChatTemplate.from_model_dir(model_dir))


def register_lora_modules(store: AdapterStore, tenants: tuple[str, ...],
                          modules: tuple[tuple[str, Path], ...]) -> None:
    """Store each `--lora-modules NAME=PATH` adapter for each tenant, validated as an upload is (AdapterError for a
    bad one, AdapterDirError for an unreadable directory: the load fails). A tenant whose newest version of NAME holds
    the same files keeps it: a restart adds no version."""
    # disable=None: a bar on a terminal, nothing in a log file
    for name, path in tqdm(modules, desc="importing adapters", unit="adapter", disable=None):
        check_id(name, "--lora-modules")
        files = read_adapter_dir(path, store.limits)
        for tenant in tenants:
            if not is_stored(store, tenant, name, files):
                record = store.put(tenant, name, files)
                logger.info("stored adapter %s version %d for tenant %s from %s", name, record.version, tenant, path)


def register_demo_adapters(store: AdapterStore, tenants: tuple[str, ...]) -> None:
    """Put the demo adapters for each tenant, if the store holds no servable adapter for this base model at all."""
    if any(row.state == READY and row.base_fingerprint == store.base_fingerprint for row in store.rows()):
        return
    adapter_dirs = demo_adapter_dirs()
    for tenant in tenants:
        for name, path in adapter_dirs.items():
            store.put(tenant, name, {file: (path / file).read_bytes() for file in ADAPTER_FILES})
    logger.info("registered the demo adapters %s for tenants %s", sorted(adapter_dirs), list(tenants))
