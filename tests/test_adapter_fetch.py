"""Remote adapter sources fetched into the local cache (orchestrator/serving/adapter_fetch.py),
against real local servers: an HTTP server (the standard library's) and an S3-compatible one
(moto's server, over HTTP, through s3fs and botocore as on AWS) - no mocked client."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from orchestrator.serving.adapter_fetch import (
    AdapterFetchError,
    digests,
    is_remote,
    local_source,
)
from orchestrator.serving.registry import AdapterEntry, AdapterRegistry, RegistryError

CONFIG = b'{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
WEIGHTS = bytes(range(256)) * 64  # 16 KiB standing in for adapter_model.safetensors


def _adapter(folder: Path, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(CONFIG)
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
    return folder


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        _Handler.hits.append(self.path)
        if self.path.startswith("/secret/"):
            self.send_error(403, "Forbidden")
            return
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if self.path.startswith("/secret/"):
            self.send_error(403, "Forbidden")
            return
        super().do_HEAD()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    root = tmp_path / "www"
    _adapter(root / "adapters" / "a1")
    _adapter(root / "adapters" / "no-weights", weights=False)
    _adapter(root / "secret" / "a3")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.hits = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


def test_an_http_adapter_is_fetched_once_checked_and_cached(http_root, tmp_path) -> None:
    cache = tmp_path / "cache"
    entry = AdapterEntry("a1", 8, uri=f"{http_root}/adapters/a1",
                         sha256={"adapter_model.safetensors": hashlib.sha256(WEIGHTS).hexdigest()})
    assert is_remote(entry) and not is_remote(AdapterEntry("s", 8, uri="sim://s"))
    path = Path(local_source(entry, cache))
    assert (path / "adapter_config.json").read_bytes() == CONFIG
    assert (path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    assert path.parent == cache and not [p for p in cache.iterdir() if p.name.startswith(".")]
    fetched = len(_Handler.hits)
    assert local_source(entry, cache) == str(path) and len(_Handler.hits) == fetched  # cached
    assert digests(path)["adapter_config.json"] == hashlib.sha256(CONFIG).hexdigest()


@pytest.mark.parametrize(("uri", "sha", "match"), [
    ("/adapters/ghost", None, r"'x': .*/adapters/ghost/adapter_config.json does not exist"),
    ("/adapters/no-weights", None, "holds no adapter_model.safetensors"),
    ("/secret/a3", None, "403"),
    ("/adapters/a1", {"adapter_model.safetensors": "0" * 64}, "has sha256 .* registry says 0000"),
])
def test_a_bad_http_source_is_a_clear_error_and_leaves_nothing(http_root, tmp_path, uri, sha,
                                                                 match) -> None:
    cache = tmp_path / "cache"
    entry = AdapterEntry("x", 8, uri=f"{http_root}{uri}", sha256=sha)
    with pytest.raises(AdapterFetchError, match=match):
        local_source(entry, cache)
    assert not cache.exists() or list(cache.iterdir()) == []  # no half-fetched adapter


def test_an_unreachable_host_is_a_clear_error(tmp_path) -> None:
    from orchestrator.control.cluster import free_port

    entry = AdapterEntry("x", 8, uri=f"http://127.0.0.1:{free_port()}/adapters/a1")
    with pytest.raises(AdapterFetchError, match="'x': cannot read"):
        local_source(entry, tmp_path / "cache")


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """moto's S3-compatible server on a free local port; AWS settings pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    from orchestrator.control.cluster import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "lorafleet", "AWS_SECRET_ACCESS_KEY": "lorafleet",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
                 "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="adapters")
    a1 = _adapter(tmp_path / "src" / "a1")
    for f in a1.iterdir():
        client.upload_file(str(f), "adapters", f"fleet/a1/{f.name}")
    yield client
    server.stop()


def test_an_s3_adapter_is_fetched_from_an_s3_compatible_server(s3, tmp_path) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # the endpoint is this test's server
    cache = tmp_path / "cache"
    path = Path(local_source(AdapterEntry("a1", 8, uri="s3://adapters/fleet/a1"), cache))
    assert (path / "adapter_model.safetensors").read_bytes() == WEIGHTS
    with pytest.raises(AdapterFetchError, match=r"'gone': s3://adapters/fleet/gone/adapter_con"):
        local_source(AdapterEntry("gone", 8, uri="s3://adapters/fleet/gone"), cache)
    with pytest.raises(AdapterFetchError, match="'nob'"):  # a bucket that does not exist
        local_source(AdapterEntry("nob", 8, uri="s3://no-such-bucket/a1"), cache)


def test_a_scheme_without_its_library_says_what_to_install(tmp_path) -> None:
    try:
        import gcsfs  # noqa: F401
        pytest.fail("gcsfs is installed here: this test checks the error without it")
    except ImportError:
        pass
    with pytest.raises(AdapterFetchError, match="needs gcsfs.*pip install gcsfs"):
        local_source(AdapterEntry("g", 8, uri="gs://bucket/a"), tmp_path / "cache")


def test_registry_sha256_is_validated_naming_the_field(tmp_path) -> None:
    ok = AdapterRegistry.build([{"id": "a", "rank": 8, "uri": "s3://b/a",
                                 "sha256": {"adapter_model.safetensors": "ab" * 32}}], roots=[])
    assert ok.get("a").sha256 == {"adapter_model.safetensors": "ab" * 32}
    for bad in ({"adapter_model.safetensors": "xyz"}, ["ab" * 32]):
        with pytest.raises(RegistryError, match=r"adapters\[0\] \(a\): sha256"):
            AdapterRegistry.build([{"id": "a", "rank": 8, "uri": "s3://b/a", "sha256": bad}],
                                  roots=[])
