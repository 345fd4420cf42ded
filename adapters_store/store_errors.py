"""Errors of the adapter store, besides AdapterError (a refused upload)."""

from lora_server.adapters_store.errors import AdapterError


class AdapterNotFound(LookupError):
    """No such adapter or version for this tenant: never uploaded, deleted, made for another base model, or another
    tenant's (which is exactly the same as never uploaded)."""


class AdapterUnusable(LookupError):
    """The version exists but its stored files failed their checksum (or vanished): quarantined, never served."""


class StoreLocked(RuntimeError):
    """Another AdapterStore (in this process or another) has the same root open."""


class AdapterTooLarge(AdapterError):
    """A refused adapter whose file is over the store's size limit (an upload, or a combination's result): the API
    answers it as it answers any body over its limit (413), not as a malformed adapter (400)."""
