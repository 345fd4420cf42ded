"""Bearer keys, tenants and roles.

`--api-keys FILE` holds `{"keys": [{"key": "...", "tenant": "...", "role": "admin"|"user"}]}`. Every route but
/health, /ready and /metrics needs a key; admins may upload and delete adapters, users may generate and list. Without
a key file the server is open: every caller is the admin of one tenant, "default".
"""

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request

from lora_server.adapters_store.upload import ID_PATTERN
from lora_server.api.errors import AUTHENTICATION, PERMISSION, ApiError

logger = logging.getLogger(__name__)

Role = Literal["admin", "user"]
ROLES = ("admin", "user")
DEFAULT_TENANT = "default"
MIN_KEY_CHARS = 16


class ApiKeysError(ValueError):
    """The key file is unreadable or malformed."""


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


OPEN_PRINCIPAL = Principal(DEFAULT_TENANT, "admin")


@dataclass(frozen=True)
class _Key:
    digest: bytes  # sha256 of the key: equal lengths, so compare_digest's time depends on nothing secret
    principal: Principal


class ApiKeys:
    def __init__(self, entries: list[tuple[str, Principal]]) -> None:
        self._keys = tuple(_Key(_digest(key), principal) for key, principal in entries)
        self.tenants = sorted({principal.tenant for _, principal in entries})

    @classmethod
    def load(cls, path: Path) -> "ApiKeys":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ApiKeysError(f"{path}: cannot read the key file ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
            raise ApiKeysError(f'{path}: expected {{"keys": [{{"key", "tenant", "role"}}, ...]}} with at least one key')
        entries, seen = [], set()
        for number, row in enumerate(data["keys"]):
            where = f"{path}: keys[{number}]"
            if not isinstance(row, dict) or set(row) != {"key", "tenant", "role"}:
                raise ApiKeysError(f'{where}: expected exactly the fields "key", "tenant" and "role"')
            key, tenant, role = row["key"], row["tenant"], row["role"]
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
                raise ApiKeysError(f"{where}: a key must be a string of at least {MIN_KEY_CHARS} characters")
            if key in seen:
                raise ApiKeysError(f"{where}: the same key appears twice")
            if not isinstance(tenant, str) or not ID_PATTERN.fullmatch(tenant):
                raise ApiKeysError(f"{where}: tenant must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-'")
            if role not in ROLES:
                raise ApiKeysError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
            seen.add(key)
            entries.append((key, Principal(tenant, role)))
        return cls(entries)

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None. Compares against every key, so the time taken says nothing about which
        key (if any) matched."""
        digest, found = _digest(key), None
        for entry in self._keys:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def principal_of(request: Request, keys: ApiKeys | None) -> Principal:
    """The caller, from `Authorization: Bearer <key>`; raises a 401 ApiError without a valid key."""
    if keys is None:
        return OPEN_PRINCIPAL
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, AUTHENTICATION, "missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    principal = keys.authenticate(token.strip())
    if principal is None:
        raise ApiError(401, AUTHENTICATION, "invalid API key", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return principal


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise ApiError(403, PERMISSION, "this key's role is 'user': only an admin key may upload or delete adapters",
                       code="insufficient_role")
