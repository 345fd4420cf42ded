"""Errors of the adapter store, besides AdapterError (a refused upload)."""


class AdapterNotFound(LookupError):
    """No such adapter or version for this tenant: never uploaded, deleted, made for another base model, or another
    tenant's (which is exactly the same as never uploaded)."""


class AdapterUnusable(LookupError):
    """The version exists but its stored files failed their checksum (or vanished): quarantined, never served."""


class StoreLocked(RuntimeError):
    """Another AdapterStore (in this process or another) has the same root open."""
