"""The folders install under one import name, `lora_server`, and claim no generic top-level name in a user's
environment: after installing, `import kernels` / `import server` do not find us, and bitsandbytes (which imports
Hugging Face's `kernels` when one is there) loads without complaint."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder_of = {package: ROOT / folder for package, folder in config["package-dir"].items()}
    expected = set()
    for package, folder in folder_of.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            expected.add(".".join([package, *parts]))
    assert set(config["packages"]) == expected


def test_installed_names_shadow_nothing(tmp_path):
    # A fresh interpreter outside the checkout, as a user's program would run.
    probe = (
        "import importlib.util, logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "import bitsandbytes\n"
        "import lora_server.kernels.lora_ops, lora_server.adapters_store, lora_server.engine.engine\n"
        "for name in ('kernels', 'server', 'adapters_store', 'loadtest'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        # The checkout's own folder of that name, not merely a path under the checkout (a .venv may live there).
        f"    assert spec is None or not str(spec.origin).startswith({str(ROOT)!r} + '/' + name), (name, spec.origin)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert "get_kernel" not in done.stderr and "from 'kernels'" not in done.stderr, done.stderr[-3000:]


def test_triton_is_a_dependency_only_where_it_has_wheels():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (triton,) = [d for d in dependencies if d.split(";")[0].strip().startswith("triton")]
    requirement, _, marker = triton.partition(";")
    assert "sys_platform == 'linux'" in marker and "platform_machine" in marker, triton
    assert any(d.startswith("tqdm") for d in dependencies)


# Every finder on sys.meta_path is wrapped so that none finds triton: `import triton` fails and find_spec answers None,
# exactly as where triton is not installed.
HIDE_TRITON = """
import sys
class HideTriton:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)
    def __getattr__(self, name):
        return getattr(self.finder, name)
sys.meta_path[:] = [HideTriton(finder) for finder in sys.meta_path]
"""


def test_import_and_the_cpu_path_work_without_triton(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "hello world => ", "max_new_tokens": 8, "adapter": "upper"}\n'
                        '{"prompt": "one two => ", "max_new_tokens": 8}\n')
    probe = HIDE_TRITON + (
        "import importlib.util\n"
        "assert importlib.util.find_spec('triton') is None\n"
        "import lora_server.api.app, lora_server.engine.engine, lora_server.kernels.lora_ops\n"
        "from lora_server.kernels.lora_ops import resolve_lora_backend\n"
        "assert resolve_lora_backend('auto', 'cpu') == 'torch'\n"
        "from lora_server.cli import main\n"
        f"main(['generate', '--device', 'cpu', '--log-level', 'warning', '--requests', {str(requests)!r}])\n"
        "assert 'triton' not in sys.modules, 'something imported triton'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 2 and all(line["token_ids"] for line in lines)
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith("lora-server generate: 2 requests") and "tokens/s" in summary, done.stderr[-3000:]
