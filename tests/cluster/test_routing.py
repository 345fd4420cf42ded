"""Which requests the ingress sends again when their replica died before answering: reads and generations, never
writes (an upload may have reached the repository)."""

import pytest

from lora_server.cluster.routing import is_retryable


@pytest.mark.parametrize(("method", "path", "retryable"), [
    ("POST", "/v1/generate", True), ("POST", "/v1/completions", True), ("POST", "/v1/chat/completions", True),
    ("GET", "/v1/adapters", True), ("GET", "/v1/models", True), ("HEAD", "/health", True),
    ("POST", "/v1/adapters", False), ("PUT", "/v1/adapters/bot", False), ("DELETE", "/v1/adapters/bot", False),
    ("POST", "/v1/adapters/combine", False), ("POST", "/v1/load_lora_adapter", False),
])
def test_only_reads_and_generations_are_sent_again(method, path, retryable):
    assert is_retryable(method, path) is retryable
