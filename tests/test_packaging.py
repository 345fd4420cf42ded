"""The folders install under one import name, `lora_server`, and claim no generic top-level name in a user's
environment: after installing, `import kernels` / `import server` do not find us, and bitsandbytes (which imports
Hugging Face's `kernels` when one is there) loads without complaint."""

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
        f"    assert spec is None or {str(ROOT)!r} not in str(spec.origin), (name, spec.origin)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert "get_kernel" not in done.stderr and "from 'kernels'" not in done.stderr, done.stderr[-3000:]
