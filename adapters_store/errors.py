"""The one error type for a refused adapter."""


class AdapterError(ValueError):
    """A user-supplied adapter is refused. `field` names the config field, tensor or file at fault; `file`, when
    set, names the file that holds it (so the message reads "adapter_config.json: use_dora: ...")."""

    def __init__(self, field: str, message: str, *, file: str = "") -> None:
        super().__init__(f"{file}: {field}: {message}" if file else f"{field}: {message}")
        self.field = field
        self.message = message
        self.file = file
