"""Imports flow one way: kernels <- server.model <- server.engine <- server.api, with adapters_store beside the
engine. This test reads every import in the house and fails on a wrong-way arrow."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("transformers", "peft", "pytest", "hypothesis", "httpx", "openai")

# package prefix -> prefixes it must never import
FORBIDDEN = {
    "kernels": ("server", "adapters_store", "loadtest"),
    "adapters_store": ("server", "kernels", "loadtest"),
    "server.model": ("server.engine", "server.api", "server.demo", "server.cli", "adapters_store", "loadtest"),
    "server.engine": ("server.api", "server.cli", "loadtest"),
    "server.api": ("server.cli", "loadtest"),
    "loadtest": ("server", "kernels", "adapters_store"),
}
# Training the demo uses transformers and PEFT by design, and the engine benchmark's peer row measures them (only when
# installed); nothing served may.
MAY_IMPORT_TEST_ONLY = {"server.demo.train", "server.engine.bench_peer"}
# The engine's policy is plain Python (testable in microseconds); the model runner alone turns it into tensors, and
# only the slot writer (and residency, which owns it) touches the device's LoRA pool.
PLAIN_PYTHON = ("server.engine.scheduling", "server.engine.adapters.keys", "server.engine.adapters.slot_pool",
                "server.engine.adapters.row_allocator", "server.engine.adapters.host_cache",
                "server.engine.merging.policy")
TENSOR_PACKAGES = ("torch", "triton", "kernels", "server.model")


def module_imports(path: Path) -> tuple[str, set[str]]:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    return module, imported


def house_files() -> list[Path]:
    return [p for top in ("kernels", "adapters_store", "server", "loadtest") for p in (ROOT / top).rglob("*.py")]


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
    assert {"kernels.lora_torch", "server.model.llama", "server.engine.scheduling.scheduler",
            "server.engine.adapters.slot_pool"} <= modules
