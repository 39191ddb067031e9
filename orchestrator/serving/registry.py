"""Adapter registry: adapter id -> (rank, where its weights are).

A replica loads adapters by what the registry says, never by what a request says: the request's
``model`` field only selects an id. Sources are either a local directory (which must lie under one
of the configured roots - a registry entry pointing at ``/etc`` or ``../../`` is refused when the
registry is built, not when a replica tries to read it) or a remote URI (``s3://``, ``gs://``,
``http(s)://``, ``hf://``) naming the adapter's folder, which the replica fetches into a local
cache before loading it (orchestrator/serving/adapter_fetch.py), checking each file's size and,
when the entry gives ``sha256: {file: hexdigest}``, its digest.

Built from a tiny-model manifest (``adapters.yaml`` of ``lorafleet tiny-model``), from a registry
YAML of the same shape (``base_model`` optional, ``adapters: [{id, rank, path | uri}]``), or, for
the ``sim`` backend which loads no weights, from a plan's adapter ranks alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hf", "https", "http", "az", "abfs")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
REGISTRY_NAME = "adapters.yaml"  # a model directory's registry (the tiny model writes one)
_URI_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


class RegistryError(ValueError):
    """A registry entry that cannot be served; the message names the adapter and the fix."""


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter: ``path`` (resolved local directory) or ``uri`` (remote), never both."""

    id: str
    rank: int
    path: str | None = None
    uri: str | None = None
    sha256: Mapping[str, str] | None = None  # file name -> hex digest (remote sources)

    @property
    def source(self) -> str:
        return self.path or self.uri or ""


@dataclass(frozen=True)
class AdapterRegistry:
    """id -> AdapterEntry, plus the roots local paths were checked against."""

    entries: Mapping[str, AdapterEntry]
    roots: tuple[str, ...] = ()
    base_model: str | None = None

    def get(self, adapter_id: str) -> AdapterEntry:
        try:
            return self.entries[adapter_id]
        except KeyError:
            raise RegistryError(
                f"adapter {adapter_id!r} is not in the adapter registry "
                f"({len(self.entries)} adapters); add it to the registry or drop it from the plan"
            ) from None

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, ids: Iterable[str]) -> tuple[AdapterEntry, ...]:
        return tuple(self.get(i) for i in ids)

    def check_ranks(self, ranks: Mapping[str, int]) -> None:
        """The plan and the registry must agree on each adapter's rank (vLLM loads the real one)."""
        clashes = [f"{a} (plan {r}, registry {self.get(a).rank})"
                   for a, r in ranks.items() if self.get(a).rank != r]
        if clashes:
            raise RegistryError("plan and adapter registry disagree on ranks: "
                                + ", ".join(clashes[:8]))

    # -- builders ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls, items: Sequence[Mapping[str, Any]], *, roots: Sequence[str | Path],
        base_dir: str | Path | None = None, base_model: str | None = None, where: str = "registry",
    ) -> AdapterRegistry:
        """Validate entries: unique ids, positive ranks, local paths under ``roots``."""
        real_roots = tuple(os.path.realpath(Path(r).expanduser()) for r in roots)
        entries: dict[str, AdapterEntry] = {}
        for i, item in enumerate(items):
            at = f"{where}: adapters[{i}]"
            if not isinstance(item, Mapping) or "id" not in item or "rank" not in item:
                raise RegistryError(f"{at}: needs id, rank and path or uri")
            aid, rank = str(item["id"]), item["rank"]
            if aid in entries:
                raise RegistryError(f"{at}: id {aid!r} is duplicated")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise RegistryError(f"{at} ({aid}): rank must be a positive integer, got {rank!r}")
            path, uri = item.get("path"), item.get("uri")
            if (path is None) == (uri is None):
                raise RegistryError(f"{at} ({aid}): give exactly one of path and uri")
            digests = item.get("sha256")
            if digests is not None and (
                    uri is None or not isinstance(digests, Mapping)
                    or not all(isinstance(k, str) and isinstance(v, str) and _HEX64.match(v)
                               for k, v in digests.items())):
                raise RegistryError(f"{at} ({aid}): sha256 must map file names to 64-hex "
                                    "digests, for a uri source")
            if uri is not None:
                entries[aid] = AdapterEntry(aid, rank, uri=check_uri(str(uri), aid),
                                            sha256=dict(digests) if digests else None)
            else:
                entries[aid] = AdapterEntry(
                    aid, rank, path=check_local_path(str(path), aid, real_roots, base_dir))
        return cls(entries, real_roots, base_model)

    @classmethod
    def from_yaml(cls, path: str | Path, *, roots: Sequence[str | Path] | None = None
                  ) -> AdapterRegistry:
        """A registry file; by default its own folder is the one allowed root."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no adapter registry")
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("adapters", []), list):
            raise RegistryError(f"{path}: expected a mapping with an `adapters` list")
        base = doc.get("base_model")
        base_path = None
        if isinstance(base, str):
            base_path = base if _URI_RE.match(base) else str((path.parent / base).resolve())
        return cls.build(doc.get("adapters") or [], roots=roots or [path.parent],
                         base_dir=path.parent, base_model=base_path, where=str(path))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, roots: Sequence[str | Path] | None = None
                       ) -> AdapterRegistry:
        """A model directory's ``adapters.yaml`` (the tiny model's: ``lorafleet tiny-model
        OUT``)."""
        return cls.from_yaml(Path(model_dir) / REGISTRY_NAME, roots=roots)

    @classmethod
    def ranks_only(cls, ranks: Mapping[str, int]) -> AdapterRegistry:
        """For the sim backend: ids and ranks, no weights to load."""
        return cls({a: AdapterEntry(a, int(r), uri=f"sim://{a}") for a, r in ranks.items()})


def split_uri(uri: str) -> tuple[str, str]:
    """(scheme, the rest) of a URI; scheme lower-cased, "" for a plain path."""
    m = _URI_RE.match(uri)
    return (m.group(1).lower(), uri[m.end():]) if m else ("", uri)


def check_uri(uri: str, adapter_id: str) -> str:
    m = _URI_RE.match(uri)
    if not m or m.group(1).lower() not in (*REMOTE_SCHEMES, "sim"):
        raise RegistryError(
            f"adapter {adapter_id!r}: {uri!r} is not a supported remote URI (schemes: "
            f"{', '.join(REMOTE_SCHEMES)}); use a local path under an allowed root instead"
        )
    return uri


def check_local_path(path: str, adapter_id: str, roots: Sequence[str],
                     base_dir: str | Path | None) -> str:
    """Resolve ``path`` (relative to ``base_dir``) and refuse anything outside ``roots``.

    realpath first, so ``..`` and symlinks cannot escape a root.
    """
    if _URI_RE.match(path):
        raise RegistryError(f"adapter {adapter_id!r}: {path!r} is a URI; put it under `uri`")
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    real = os.path.realpath(p)
    if not roots:
        raise RegistryError(f"adapter {adapter_id!r}: local paths need at least one allowed root")
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise RegistryError(
            f"adapter {adapter_id!r}: {real} is outside the allowed adapter roots "
            f"({', '.join(roots)}); refusing to load it. Move it under a root or add its folder "
            "with --adapter-root"
        )
    if not Path(real, "adapter_config.json").is_file():
        raise RegistryError(f"adapter {adapter_id!r}: {real}/adapter_config.json is missing")
    return real
