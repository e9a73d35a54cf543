"""Security defaults: the local Ray dashboard listens on loopback only (checked on the real sockets)."""

from __future__ import annotations

import socket

import psutil
import ray

from metatrain.pipeline.jobs.train import init_ray


def _external_ip() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_the_local_ray_dashboard_binds_to_loopback_only(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    assert init_ray(None) is True
    try:
        url = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") \
            else ray._private.worker.global_worker.node.address_info["webui_url"]
        host, port = url.replace("http://", "").rsplit(":", 1)
        assert host == "127.0.0.1", url
        listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and
                     c.laddr.port == int(port)]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
        ip = _external_ip()  # and, where the machine has another address, refused there
        if ip is not None:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((ip, int(port))) != 0
    finally:
        ray.shutdown()
