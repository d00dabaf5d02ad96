"""`serve` command-line rules that need no server: who may bind where, and how outside workers join `serve all`."""
from __future__ import annotations

import argparse

import pytest

from ds_vicuna.serve.cli import _check_exposure, _join_instructions
from ds_vicuna.serve.http_util import is_loopback


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                           ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                           ("10.0.0.2", False), ("node7", False)])
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_exposure_needs_a_secret_or_insecure(capsys):
    _check_exposure(argparse.Namespace(worker_secret=None, insecure=False), "worker", "127.0.0.1")
    _check_exposure(argparse.Namespace(worker_secret="s", insecure=False), "worker", "0.0.0.0")
    with pytest.raises(SystemExit, match="refusing to start the worker on 0.0.0.0"):
        _check_exposure(argparse.Namespace(worker_secret=None, insecure=False), "worker", "0.0.0.0")
    _check_exposure(argparse.Namespace(worker_secret=None, insecure=True), "controller", "0.0.0.0")
    assert "WARNING: the controller listens on 0.0.0.0 with NO worker secret" in capsys.readouterr().err


def test_serve_all_tells_how_outside_workers_join():
    local = _join_instructions(argparse.Namespace(controller_host="127.0.0.1"), "http://h:1", True)
    assert "--controller-host 0.0.0.0" in local and "--worker-secret" in local
    shared = _join_instructions(argparse.Namespace(controller_host="0.0.0.0"), "http://head:21001", True)
    assert "ds-vicuna serve worker" in shared and "--controller http://head:21001" in shared
    assert "DS_VICUNA_WORKER_SECRET" in shared
    generated = _join_instructions(argparse.Namespace(controller_host="0.0.0.0"), "http://head:21001", False)
    assert "generated and is not shown" in generated
