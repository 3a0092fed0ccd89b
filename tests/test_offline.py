"""The suite runs with no network: the caller exported the hub's offline variables, and the socket guard installed
by conftest.py refuses (and records) every non-local lookup or connection, so contacting a hub fails the session."""

from __future__ import annotations

import socket
import urllib.request

import conftest
import pytest


def test_offline_variables_exported_by_caller():
    unset = [k for k, v in conftest.CALLER_ENV.items() if v != "1"]
    assert not unset, (f"{', '.join(unset)} not set to 1 by the caller: run the suite through scripts/test.sh, "
                       "or export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1")


def test_guard_refuses_and_records_hub_access():
    before = len(conftest.NETWORK_ATTEMPTS)
    with pytest.raises(OSError):
        urllib.request.urlopen("https://huggingface.co/api/models/gpt2", timeout=5)
    with pytest.raises(OSError):
        socket.create_connection(("1.1.1.1", 443), timeout=5)
    tried = conftest.NETWORK_ATTEMPTS[before:]
    assert any("huggingface.co" in t for t in tried) and any("1.1.1.1" in t for t in tried), tried
    del conftest.NETWORK_ATTEMPTS[before:]  # these two were this test's own, deliberate attempts


def test_guard_allows_loopback():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        socket.create_connection(srv.getsockname(), timeout=5).close()
    finally:
        srv.close()


@pytest.mark.slow
def test_default_model_tokenizer_and_data_need_no_network(smol):
    """Loading the default model (session fixture), its tokenizer and the eval text touches no hub."""
    from slr.data.corpora import load_text

    before = len(conftest.NETWORK_ATTEMPTS)
    model, tok, _ = smol
    text, label = load_text(None, "test")
    assert label == "wiki-sample:test" and len(text) > 1000
    assert tok("hello world").input_ids
    assert conftest.NETWORK_ATTEMPTS[before:] == []
