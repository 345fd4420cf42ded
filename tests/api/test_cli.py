"""The command line a person expects: --version, defaults in every help, subcommands listed, logging flags, the access
log without the probes, `merge` files with ordinary permissions; and the checks on adapter directories."""

import json
import logging
import os
import stat

import pytest
import torch

from lora_server.adapters_store import StoreLimits
from lora_server.api import serve
from lora_server.api.adapter_dirs import AdapterDirError, allowed_dir, read_adapter_dir
from lora_server.api.cli_options import AccessLogFilter, JsonFormatter
from lora_server.api.errors import ApiError
from lora_server.cli import build_parser, generate_summary
from lora_server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from lora_server.export import export_merged


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    out = capsys.readouterr().out
    assert out.startswith("lora-server ") and out.split()[1][0].isdigit()


def test_top_level_help_lists_every_subcommand(capsys):
    out = help_of(capsys)
    assert all(f"    {command} " in out for command in ("generate", "serve", "merge")), out


@pytest.mark.parametrize("command", ["serve", "generate", "merge"])
def test_every_option_with_a_default_shows_it(capsys, command):
    out = " ".join(help_of(capsys, command).split())  # the help's lines joined, as one spaced text
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    with_defaults = [action for action in sub._actions
                     if action.option_strings and action.default not in (None, False, [], "==SUPPRESS==")]
    assert len(with_defaults) >= 3 and out.count("default:") >= len(with_defaults)
    assert "--log-level" in out and "--log-format" in out and "default: info" in out
    if command == "serve":
        assert "--port PORT default: 8000" in out and "default: ['/metrics', '/health', '/ready']" in out


def test_access_log_skips_the_probes_and_keeps_api_requests():
    skip = AccessLogFilter(["/metrics", "/health", "/ready"])

    def record(path: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", "GET", path, "1.1", 200), None)

    assert not skip.filter(record("/metrics")) and not skip.filter(record("/health?verbose=1"))
    assert skip.filter(record("/v1/completions")) and skip.filter(record("/v1/models"))


def test_json_log_lines_parse():
    record = logging.LogRecord("lora_server.x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "WARNING" and line["logger"] == "lora_server.x"


def test_generate_summary_is_one_line():
    line = generate_summary(3, 120, 2.0)
    assert "\n" not in line and "3 requests" in line and "120 tokens" in line and "60.0 tokens/s" in line


def test_merge_writes_files_with_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        export_merged(DEMO_MODEL_DIR, demo_adapter_dirs()["upper"], tmp_path / "out")
    finally:
        os.umask(old)
    files = list((tmp_path / "out").iterdir())
    assert any(f.name == "model.safetensors" for f in files)
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


# ---------------------------------------------------------------- adapter directories


def test_allowed_dir_follows_symlinks_and_refuses_escapes(tmp_path):
    root, outside = (tmp_path / "root").resolve(), tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "inner-link").symlink_to(root / "a", target_is_directory=True)
    assert allowed_dir(str(root / "a"), [root]) == root / "a"
    assert allowed_dir(str(root / "inner-link"), [root]) == root / "a"
    for path, status in ((str(root / "link"), 403), (str(outside), 403), (f"{root}/a/../a", 400), ("a", 400)):
        with pytest.raises(ApiError) as raised:
            allowed_dir(path, [root])
        assert raised.value.status == status and raised.value.param == "lora_path", path
    with pytest.raises(ApiError) as raised:
        allowed_dir(str(root / "a"), [])
    assert raised.value.status == 403


def test_a_symlinked_file_cannot_lead_out(tmp_path):
    root = (tmp_path / "root").resolve()
    source = demo_adapter_dirs()["upper"]
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    (root / "adapter" / "adapter_model.safetensors").symlink_to(source / "adapter_model.safetensors")
    with pytest.raises(AdapterDirError, match="leads out"):
        read_adapter_dir(root / "adapter", StoreLimits(), [root])
    files = read_adapter_dir(root / "adapter", StoreLimits())  # --lora-modules: the operator's own paths
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    with pytest.raises(AdapterDirError, match="over"):
        read_adapter_dir(root / "adapter", StoreLimits(max_config_bytes=8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_serve_refuses_cuda_graphs_on_without_cuda(caplog):
    """--cuda-graphs on where there is no CUDA is refused by name, before anything loads; auto and off serve."""
    args = build_parser().parse_args(["serve", "--cuda-graphs", "on"])
    assert serve.run_serve(args) == 2
    assert "--cuda-graphs on needs a CUDA device" in caplog.text
    for setting in ("auto", "off"):
        args = build_parser().parse_args(["serve", "--cuda-graphs", setting])
        assert serve.engine_options(args).cuda_graphs == setting
