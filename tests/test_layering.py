"""Imports flow one way: kernels <- server.model <- server.engine <- server.api, with adapters_store beside the
engine. This test reads every import in the house and fails on a wrong-way arrow.

The folders install under one import name (pyproject.toml): server/ is `lora_server`, kernels/ is
`lora_server.kernels`, adapters_store/ is `lora_server.adapters_store`, loadtest/ is `lora_server.loadtest`."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("transformers", "peft", "pytest", "hypothesis", "httpx", "openai")

PACKAGE_OF_FOLDER = {"server": "lora_server", "kernels": "lora_server.kernels",
                     "adapters_store": "lora_server.adapters_store", "loadtest": "lora_server.loadtest"}
KERNELS, STORE, LOADTEST = "lora_server.kernels", "lora_server.adapters_store", "lora_server.loadtest"
SERVER_PARTS = tuple(f"lora_server.{part}" for part in ("model", "engine", "api", "demo", "cli", "export"))
# package prefix -> prefixes it must never import
FORBIDDEN = {
    KERNELS: (*SERVER_PARTS, STORE, LOADTEST),
    STORE: (*SERVER_PARTS, KERNELS, LOADTEST),
    "lora_server.model": ("lora_server.engine", "lora_server.api", "lora_server.demo", "lora_server.cli", STORE,
                          LOADTEST),
    "lora_server.engine": ("lora_server.api", "lora_server.cli", LOADTEST),
    "lora_server.api": ("lora_server.cli", LOADTEST),
    LOADTEST: (*SERVER_PARTS, KERNELS, STORE),
}
# Training the demo uses transformers and PEFT by design, and the engine benchmark's peer row measures them (only when
# installed); nothing served may.
MAY_IMPORT_TEST_ONLY = {"lora_server.demo.train", "lora_server.engine.bench_peer"}
# The engine's policy is plain Python (testable in microseconds); the model runner alone turns it into tensors, and
# only the slot writer (and residency, which owns it) touches the device's LoRA pool.
PLAIN_PYTHON = ("lora_server.engine.scheduling", "lora_server.engine.adapters.keys",
                "lora_server.engine.adapters.slot_pool", "lora_server.engine.adapters.row_allocator",
                "lora_server.engine.adapters.host_cache", "lora_server.engine.merging.policy")
TENSOR_PACKAGES = ("torch", "triton", KERNELS, "lora_server.model")


def module_imports(path: Path) -> tuple[str, set[str]]:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    module = ".".join([PACKAGE_OF_FOLDER[folder], *rest]).removesuffix(".__init__")
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    return module, imported


def house_files() -> list[Path]:
    return [p for top in PACKAGE_OF_FOLDER for p in (ROOT / top).rglob("*.py")]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", house_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    module, imported = module_imports(path)
    for owner, forbidden in FORBIDDEN.items():
        if _under(module, owner):
            wrong = sorted(name for name in imported for f in forbidden if _under(name, f))
            assert not wrong, f"{module} imports {wrong}, against the house's import direction"
    if module not in MAY_IMPORT_TEST_ONLY:
        test_only = sorted(name for name in imported for t in TEST_ONLY if _under(name, t))
        assert not test_only, f"{module} imports test-only packages {test_only}"
    if any(_under(module, plain) for plain in PLAIN_PYTHON):
        tensors = sorted(name for name in imported for t in TENSOR_PACKAGES if _under(name, t))
        assert not tensors, f"{module} imports {tensors}, but it is plain Python by design"


def test_layering_check_sees_the_house():
    modules = {module_imports(p)[0] for p in house_files()}
    assert {"lora_server.kernels.lora_torch", "lora_server.model.llama", "lora_server.engine.scheduling.scheduler",
            "lora_server.engine.adapters.slot_pool"} <= modules


def test_only_the_namespace_is_imported():
    """Every import of the house's own code goes through `lora_server`, never a bare folder name."""
    bare = sorted((module, name) for path in house_files() for module, names in [module_imports(path)]
                  for name in names if name.split(".")[0] in PACKAGE_OF_FOLDER)
    assert not bare, bare[:10]
