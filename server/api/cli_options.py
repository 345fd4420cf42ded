"""What every `lora-server` subcommand shares: the help's layout (defaults shown), the version, and logging
(`--log-level`, `--log-format text|json`, and the access-log filter that drops the probes' lines)."""

import argparse
import copy
import json
import logging
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Scraped every few seconds: under a 1-second scrape they were ~90% of the access log, and say nothing about traffic
PROBE_PATHS = ("/metrics", "/health", "/ready")
ACCESS_LOGGER = "uvicorn.access"


def package_version() -> str:
    try:
        return version("lora-server")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default after its help, as ArgumentDefaultsHelpFormatter
    would show it; but also for options without help text, which that formatter skips."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _has_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "%(default)" not in help_text and "(default:" not in help_text and _has_default(action):
            help_text += " (default: %(default)s)"
        return help_text


def _has_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default not in (None, argparse.SUPPRESS, False, []) \
        and not isinstance(action, argparse._VersionAction | argparse._HelpAction)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    group.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="json: one JSON object per line (time, level, logger, message), for log collectors")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class AccessLogFilter(logging.Filter):
    """Drops uvicorn's access-log lines for `skip_paths` (query strings ignored); keeps every other request's."""

    def __init__(self, skip_paths: Iterable[str]) -> None:
        super().__init__()
        self.skip_paths = frozenset(skip_paths)

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record args: (client address, method, path with query, HTTP version, status)
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            return args[2].split("?", 1)[0] not in self.skip_paths
        return True


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """The root logger's one stderr handler, at `level`, in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def skip_access_log_paths(paths: Iterable[str]) -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, AccessLogFilter)]:
        logger.removeFilter(old)
    logger.addFilter(AccessLogFilter(paths))
