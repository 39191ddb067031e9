"""Optional API keys: each key belongs to a tenant and may reach only that tenant's adapters.

Keys file (YAML)::

    keys:
      - {key: sk-acme-123, tenant: acme, adapters: [acme-*, shared-summarise], base_model: true}
      - {key_sha256: 9f86d0..., tenant: globex, adapters: ["globex-*"]}

``adapters`` are ids or shell-style patterns (``*`` alone: every adapter). Only SHA-256 hashes of
keys are kept once loaded (they travel to the ingress replicas as init arguments, and end up in
Ray's logs and dashboard otherwise). No keys configured = open access.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.serving.backend import Forbidden, Unauthorized


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...]  # ids or patterns
    base_model: bool = False

    def allows(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, p) for p in self.adapters)


@dataclass(frozen=True)
class ApiKeys:
    """sha256(key) -> Tenant; empty = no authentication."""

    tenants: Mapping[str, Tenant]

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def tenant(self, authorization: str | None) -> Tenant | None:
        """The caller's tenant from an ``Authorization: Bearer KEY`` header (401 if wrong)."""
        if not self.enabled:
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        tenant = self.tenants.get(key_hash(authorization[7:].strip()))
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant

    def check(self, tenant: Tenant | None, model: str, *, is_base: bool) -> None:
        if tenant is None:
            return
        if (tenant.base_model if is_base else tenant.allows(model)):
            return
        raise Forbidden(f"API key of tenant {tenant.name!r} may not use model {model!r}",
                        param="model")

    def visible(self, tenant: Tenant | None, adapters: Sequence[str]) -> list[str]:
        return list(adapters) if tenant is None else [a for a in adapters if tenant.allows(a)]

    def to_dict(self) -> dict[str, Any]:
        """Hashed form (what the ingress replicas receive)."""
        return {"keys": [{"key_sha256": h, "tenant": t.name, "adapters": list(t.adapters),
                          "base_model": t.base_model} for h, t in self.tenants.items()]}

    @classmethod
    def from_dict(cls, doc: Any, where: str = "api keys") -> ApiKeys:
        if doc is None:
            return cls({})
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError(f"{where}: expected a mapping with a `keys` list")
        tenants: dict[str, Tenant] = {}
        for i, item in enumerate(doc["keys"]):
            at = f"{where}: keys[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{at}: must be a mapping")
            if ("key" in item) == ("key_sha256" in item):
                raise ValueError(f"{at}: give exactly one of key and key_sha256")
            h = key_hash(str(item["key"])) if "key" in item else str(item["key_sha256"]).lower()
            adapters = item.get("adapters", [])
            if isinstance(adapters, str) or not isinstance(adapters, list):
                raise ValueError(f"{at}: adapters must be a list of ids or patterns")
            if h in tenants:
                raise ValueError(f"{at}: duplicated key")
            tenants[h] = Tenant(str(item.get("tenant", f"tenant-{i}")),
                                tuple(str(a) for a in adapters), bool(item.get("base_model")))
        return cls(tenants)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ApiKeys:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no API keys file")
        return cls.from_dict(yaml.safe_load(path.read_text()), str(path))
