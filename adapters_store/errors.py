"""The one error type for a refused adapter."""


class AdapterError(ValueError):
    """A user-supplied adapter is refused. `field` names the config field, tensor or file at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
