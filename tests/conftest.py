"""Shared test setup: never reach a model hub; one SmolLM2-135M load per session for the slow tests.

Slow tests (``@pytest.mark.slow``) use the real default cache (``$SLR_CACHE`` or ``~/.cache/slr``); nothing here
skips them by default -- deselect them with ``-m "not slow"``.

Network guard: for the whole session every DNS lookup of a non-local name and every TCP/UDP connect to a non-loopback
address is refused and recorded (loopback stays open for torch.distributed's gloo store). A session that recorded
any attempt fails at the end (``pytest_sessionfinish``), whichever test made it; tests/test_offline.py checks the
guard itself and that the caller exported the offline variables.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
CALLER_ENV = {k: os.environ.get(k) for k in OFFLINE_VARS}  # before this file sets them (scripts/test.sh exports them)
NETWORK_ATTEMPTS: list[str] = []

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOL = "smollm2-135m"


def _local(host) -> bool:
    if not isinstance(host, str):
        return True
    if host in ("localhost", "") or host.endswith(".localhost") or host == socket.gethostname():
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _install_guard() -> None:
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not _local(address[0]):
            NETWORK_ATTEMPTS.append(f"connect {address[0]}:{address[1]}")
            raise OSError(f"network access is disabled in the test suite (tried {address[0]})")

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            NETWORK_ATTEMPTS.append(f"resolve {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"network access is disabled in the test suite ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo


_install_guard()


def pytest_sessionfinish(session, exitstatus):
    if NETWORK_ATTEMPTS:
        tried = ", ".join(sorted(set(NETWORK_ATTEMPTS)))
        print(f"\nnetwork access attempted during the tests (must be offline): {tried}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer, ModelInfo) of the default SmolLM2-135M, loaded once (fp32, CPU). Do not mutate it:
    tests that compress take a ``copy.deepcopy`` of the model."""
    from slr.models import load_model

    return load_model(SMOL, device="cpu")


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch):
    """(tiny LLaMA HF folder, 1600-word corpus) in tmp_path, with a private $SLR_CACHE."""
    from test_cli import make_hf_folder

    monkeypatch.setenv("SLR_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny-llama"
    make_hf_folder(src)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 37) % 100}" for i in range(1600)) + "\n")
    return src, text
