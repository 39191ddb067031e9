"""Remote adapter sources -> a local directory vLLM can load (``add_lora`` reads local paths).

A registry entry with a ``uri`` names a *directory* of PEFT files: ``s3://bucket/prefix``,
``gs://bucket/prefix``, ``http(s)://host/path`` (through fsspec: s3fs, gcsfs, aiohttp) or
``hf://owner/repo[@revision]`` (through ``huggingface_hub``). The replica fetches the adapter's
files - ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``) -
into a cache on its node before registering it: to a temporary folder first, each file's size
checked against the source's and, when the registry gives ``sha256`` per file, its digest; then
renamed into place, so a half-fetched adapter is never loaded. A source that is missing,
unauthorised or unreachable is an ``AdapterFetchError`` naming the adapter, the file and what to
do - never a path handed to vLLM that fails later ("No adapter found for s3://...").

The cache is ``$LORAFLEET_ADAPTER_CACHE`` (default ``~/.cache/lorafleet/adapters``), one folder
per source URI (and revision); a cached adapter whose files are all there is not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.serving.registry import AdapterEntry, split_uri

CACHE_ENV = "LORAFLEET_ADAPTER_CACHE"
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_FSSPEC_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class AdapterFetchError(RuntimeError):
    """A remote adapter that could not be fetched; the message names it and the fix."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorafleet" / "adapters")


def is_remote(entry: AdapterEntry) -> bool:
    """Whether ``entry`` must be fetched before vLLM can load it (``sim://`` never is)."""
    return entry.uri is not None and split_uri(entry.uri)[0] != "sim"


def local_source(entry: AdapterEntry, cache: Path | None = None) -> str:
    """The local directory to give vLLM for ``entry``: its path, or the fetched copy."""
    if not is_remote(entry):
        return entry.source
    assert entry.uri is not None
    key = hashlib.sha256(entry.uri.encode()).hexdigest()[:24]
    target = (cache or cache_root()) / f"{entry.id}-{key}"
    if _complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.id}-", dir=target.parent))
    try:
        scheme = split_uri(entry.uri)[0]
        if scheme == "hf":
            _fetch_hf(entry, tmp)
        else:
            _fetch_fsspec(entry, tmp)
        _check_digests(entry, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another replica on this node fetched it first
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and any((folder / w).is_file() for w in WEIGHT_FILES)


def _filesystem(entry: AdapterEntry) -> tuple[Any, str]:
    import fsspec

    assert entry.uri is not None
    scheme = split_uri(entry.uri)[0]
    try:
        fs, root = fsspec.core.url_to_fs(entry.uri)
    except ImportError as exc:
        need = _FSSPEC_PACKAGES.get(scheme, f"an fsspec implementation for {scheme}://")
        raise AdapterFetchError(
            f"adapter {entry.id!r}: {entry.uri} needs {need}, which is not installed here "
            f"(pip install {need}, matching fsspec {fsspec.__version__})") from exc
    # fsspec keeps the scheme in http(s) paths and strips it for object stores
    return fs, root.rstrip("/")


def _fetch_fsspec(entry: AdapterEntry, into: Path) -> None:
    fs, root = _filesystem(entry)
    got_weights = False
    for name in (CONFIG_FILE, *WEIGHT_FILES):
        if name in WEIGHT_FILES and got_weights:
            break  # the first weights file found is the adapter's: no probe for the other
        src = f"{root}/{name}"
        try:
            info = fs.info(src)
        except FileNotFoundError as exc:
            # fsspec's HTTP filesystem reports any failed probe as not found; the HTTP status
            # it saw is the cause (401/403: credentials, not a missing file)
            status = getattr(exc.__cause__, "status", None)
            if status in (401, 403):
                raise AdapterFetchError(
                    f"adapter {entry.id!r}: not allowed to read {entry.uri}/{name} (HTTP "
                    f"{status}); check the URL's credentials") from None
            cause = exc.__cause__
            if cause is not None and status != 404:  # another status, or no connection
                what = f"HTTP {status}" if status else f"{type(cause).__name__}: {cause}"
                raise AdapterFetchError(f"adapter {entry.id!r}: cannot read {entry.uri}/{name} "
                                        f"({what})") from None
            if name == CONFIG_FILE:
                raise AdapterFetchError(
                    f"adapter {entry.id!r}: {entry.uri}/{name} does not exist (the uri names "
                    "the adapter's folder, which must hold adapter_config.json and "
                    "adapter_model.safetensors)") from None
            continue
        except PermissionError as exc:
            raise AdapterFetchError(
                f"adapter {entry.id!r}: not allowed to read {entry.uri}/{name} ({exc}); check "
                "the replica nodes' credentials") from None
        except Exception as exc:  # unreachable host, refused connection, bad credentials
            raise AdapterFetchError(
                f"adapter {entry.id!r}: cannot read {entry.uri}/{name}: "
                f"{type(exc).__name__}: {exc}") from None
        try:
            fs.get_file(src, str(into / name))
        except Exception as exc:
            raise AdapterFetchError(f"adapter {entry.id!r}: fetching {entry.uri}/{name} "
                                    f"failed: {type(exc).__name__}: {exc}") from None
        size = info.get("size")
        got = (into / name).stat().st_size
        if size is not None and int(size) != got:
            raise AdapterFetchError(f"adapter {entry.id!r}: {entry.uri}/{name} is {size} bytes "
                                    f"at the source but {got} arrived (a broken transfer?)")
        got_weights |= name in WEIGHT_FILES
    if not got_weights:
        raise AdapterFetchError(f"adapter {entry.id!r}: {entry.uri} holds no "
                                f"{' or '.join(WEIGHT_FILES)}")


def _fetch_hf(entry: AdapterEntry, into: Path) -> None:
    """``hf://owner/repo[@revision]``: the adapter's files from the Hugging Face Hub (or the
    endpoint ``HF_ENDPOINT`` names), with ``HF_TOKEN`` for gated or private repositories."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert entry.uri is not None
    repo = split_uri(entry.uri)[1].strip("/")
    repo, _, revision = repo.partition("@")
    try:
        snapshot_download(repo, revision=revision or None, local_dir=str(into),
                          allow_patterns=[CONFIG_FILE, *WEIGHT_FILES])
    except GatedRepoError:
        raise AdapterFetchError(f"adapter {entry.id!r}: {entry.uri} is gated; set HF_TOKEN on "
                                "the replica nodes to a token with access") from None
    except RepositoryNotFoundError:
        raise AdapterFetchError(f"adapter {entry.id!r}: {entry.uri} does not exist or is "
                                "private (set HF_TOKEN for a private repository)") from None
    except RevisionNotFoundError:
        raise AdapterFetchError(f"adapter {entry.id!r}: {entry.uri}: no revision "
                                f"{revision!r}") from None
    except Exception as exc:
        raise AdapterFetchError(f"adapter {entry.id!r}: fetching {entry.uri} failed: "
                                f"{type(exc).__name__}: {exc}") from None
    shutil.rmtree(into / ".cache", ignore_errors=True)
    if not _complete(into):
        raise AdapterFetchError(f"adapter {entry.id!r}: {entry.uri} holds no {CONFIG_FILE} "
                                f"with {' or '.join(WEIGHT_FILES)}")


def _check_digests(entry: AdapterEntry, folder: Path) -> None:
    for name, want in (entry.sha256 or {}).items():
        path = folder / name
        if not path.is_file():
            raise AdapterFetchError(f"adapter {entry.id!r}: the registry gives a sha256 for "
                                    f"{name}, which {entry.uri} does not hold")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want.lower():
            raise AdapterFetchError(f"adapter {entry.id!r}: {entry.uri}/{name} has sha256 "
                                    f"{h.hexdigest()}, the registry says {want}")


def digests(folder: str | Path) -> Mapping[str, str]:
    """sha256 of each adapter file in ``folder`` (what a registry's ``sha256`` holds)."""
    out = {}
    for name in (CONFIG_FILE, *WEIGHT_FILES):
        p = Path(folder) / name
        if p.is_file():
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
