"""The HTTP layer's limits and knobs: one frozen dataclass, validated at construction."""

from dataclasses import dataclass, fields
from pathlib import Path

MiB = 1 << 20


@dataclass(frozen=True)
class ApiConfig:
    max_body_bytes: int = 1 * MiB  # a JSON request body
    max_upload_bytes: int = 512 * MiB  # each file of an adapter upload (the multipart body may be a little larger)
    max_new_tokens_limit: int = 4096  # a request asking for more is refused, not silently cut
    default_max_new_tokens: int = 64  # /v1/generate without max_new_tokens (the OpenAI routes use OpenAI's defaults)
    # A /v1/completions list of prompts: each is its own request in the queue, so one request could otherwise hold
    # every --max-pending slot
    max_prompts_per_request: int = 64
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may run on before they are aborted
    # Slow clients: a request's headers must arrive within header_timeout_s (of the connection opening, or of its
    # first byte), and its whole body within body_timeout_s of the headers; slower gets a 408 and a closed connection.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    health_stall_s: float = 60.0  # /health turns red when the engine loop has made no progress for this long
    retry_after_s: int = 1  # the Retry-After of a 429 (queue full)
    metrics_top_adapters: int = 20  # adapters with their own metric series; the rest are summed as "other"
    # POST /v1/load_lora_adapter reads adapters only from under these directories (resolved); empty: the route is 403
    adapter_dirs_allowed: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name == "adapter_dirs_allowed":
                continue
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{field.name} must be a positive number, got {value!r}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) is over max_new_tokens_limit "
                             f"({self.max_new_tokens_limit})")

    @property
    def max_upload_body_bytes(self) -> int:
        """The whole multipart body of an upload: both files, the form fields and the part headers."""
        return self.max_upload_bytes + 1 * MiB
