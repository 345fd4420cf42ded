"""The one error the command line prints as a single line (no traceback): an unreachable server, a refused key, an
unknown adapter, a bad option."""


class LoadtestError(Exception):
    pass
