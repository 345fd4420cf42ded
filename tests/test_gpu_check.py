"""make gpu-check's script, as far as a machine without CUDA can check it: it says so and exits 2, it names missing
packages up front, and every part it runs exists (the modules and test files it names)."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch

from lora_server import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["gpu_check", "--out", str(tmp_path / "out.md")])
    assert gpu_check.main() == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out.md").exists()


def test_packages_are_named_with_versions_or_missing():
    assert gpu_check.installed(("torch", "no-such-package-here")) == (
        f"torch {importlib.metadata.version('torch')}, no-such-package-here MISSING")


def test_every_part_names_what_exists_and_the_budget_fits_the_lease():
    for _, command, seconds in gpu_check.PARTS:
        assert seconds > 0
        assert command[1:3] == ["-P", "-m"], command  # the checkout's root off sys.path: see gpu_check
        if command[3] == "pytest":
            paths = [arg for arg in command[4:] if arg.startswith("tests/")]
            assert paths and all((ROOT / path).exists() for path in paths), paths
        else:
            assert importlib.util.find_spec(command[3]) is not None, command
    assert sum(seconds for _, _, seconds in gpu_check.PARTS) <= 8 * 60

