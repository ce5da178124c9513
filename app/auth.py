"""API key → Tenant. No Ray.

Keys come from the config (`ingress.auth.tenants[].key_sha256`), a keys file of the same
shape, or `$DUALPATH_API_KEYS` (`tenant:key,tenant:key`); only their SHA-256 digests are
kept. With no key anywhere the app runs open: every caller is the `anonymous` tenant, and
the start-up log says so. A presented key is hashed and compared with every stored digest
by `hmac.compare_digest`, so the time taken does not depend on how much of one matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator

from app.admission.ratelimit import RateLimits
from app.api.errors import AuthenticationError
from deployments.options import Section
from engine import env as env_vars

logger = logging.getLogger(__name__)

Tier = Literal["priority", "default", "flex"]
TIERS: tuple[Tier, ...] = ("priority", "default", "flex")
ANONYMOUS = "anonymous"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantSection(Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    key_sha256: list[str] = Field(default_factory=list, description="hex SHA-256 of each key")
    limits: RateLimits = Field(default_factory=RateLimits)
    max_concurrent: int | None = Field(default=None, ge=1, description="queued + running")
    tiers: list[Tier] = Field(default_factory=lambda: list(TIERS), min_length=1)
    weight: float = Field(default=1.0, gt=0, description="share within a tier")
    admin: bool = Field(default=False, description="may read every tenant's usage")
    cache_group: str | None = Field(
        default=None, description="tenants in one group share stored KV (default: own)"
    )

    @field_validator("key_sha256")
    @classmethod
    def _hex_digests(cls, v: list[str]) -> list[str]:
        for digest in v:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError("key_sha256 entries are 64 hex digits (sha256 of the key)")
        return [d.lower() for d in v]


class AuthSection(Section):
    tenants: list[TenantSection] = Field(default_factory=list)
    keys_file: Path | None = Field(default=None, description="YAML/JSON list of tenants")
    keys_env: str = Field(default="DUALPATH_API_KEYS", description="tenant:key,tenant:key")
    anonymous: TenantSection = Field(
        default_factory=lambda: TenantSection(name=ANONYMOUS),
        description="the limits of every caller when no keys are configured",
    )


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    config: TenantSection

    @property
    def salt(self) -> bytes:
        """Enters every KV block key: tenants never hit each other's stored KV unless they
        share a cache group. The open (anonymous) app uses no salt."""
        if self.name == ANONYMOUS:
            return b""
        group = self.config.cache_group or f"tenant:{self.name}"
        return hashlib.sha256(f"dualpath-kv:{group}".encode()).digest()[:16]


class Authenticator:
    def __init__(self, section: AuthSection, environ: dict[str, str] | None = None):
        tenants = {t.name: t for t in section.tenants}
        if section.keys_file is not None:
            for t in _read_keys_file(section.keys_file.expanduser()):
                tenants[t.name] = _merge(tenants.get(t.name), t)
        keys_env = section.keys_env
        env = env_vars.named(keys_env) if environ is None else environ.get(keys_env, "")
        for item in filter(None, (s.strip() for s in env.split(","))):
            name, sep, key = item.partition(":")
            if not sep or not name or not key:
                raise ValueError(f"${section.keys_env}: expected tenant:key, got {item[:24]!r}")
            extra = TenantSection(name=name, key_sha256=[hash_key(key)])
            tenants[name] = _merge(tenants.get(name), extra)
        self.by_digest: dict[str, Tenant] = {}
        for config in tenants.values():
            for digest in config.key_sha256:
                self.by_digest[digest] = Tenant(config.name, config)
        self.tenants = {name: Tenant(name, c) for name, c in tenants.items()}
        self.open = not self.by_digest
        if self.open and (section.keys_file is not None or section.tenants):
            # fail closed: keys were meant to be required, but none came through
            raise ValueError(
                "auth names tenants or a keys_file but no API key: refusing to run open"
            )
        self.anonymous = Tenant(ANONYMOUS, section.anonymous)
        if self.open:
            logger.warning("no API keys configured: the API is open (every caller is anonymous)")
        else:
            logger.info("API keys required: %d tenants, %d keys", len(tenants), len(self.by_digest))

    def authenticate(self, authorization: str | None) -> Tenant:
        """`Authorization: Bearer <key>` (or a bare key from the handle API) → Tenant."""
        if self.open:
            return self.anonymous
        if not authorization:
            raise AuthenticationError(
                "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key"
            )
        key = authorization[7:] if authorization[:7].lower() == "bearer " else authorization
        digest = hash_key(key.strip())
        tenant = None
        for stored, candidate in self.by_digest.items():  # every digest, no early exit
            if hmac.compare_digest(stored, digest):
                tenant = candidate
        if tenant is None:
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return tenant


def _read_keys_file(path: Path) -> list[TenantSection]:
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else None
    if data is None:
        data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("tenants", [])
    return [TenantSection.model_validate(item) for item in data]


def _merge(base: TenantSection | None, extra: TenantSection) -> TenantSection:
    """A tenant named in several places keeps the first one's limits and all keys."""
    if base is None:
        return extra
    keys = list(dict.fromkeys(base.key_sha256 + extra.key_sha256))
    return base.model_copy(update={"key_sha256": keys})
