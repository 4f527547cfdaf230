"""The agent's wire format, codecs and metrics rendering: pure, no agent, no root."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pelagos_bpf import DEFAULT_DEVICE_RULES, CgroupConfig, CgroupDeviceRule
from pelagos_bpf.agent import protocol as p
from pelagos_bpf.agent.codec import (
    AgentError,
    config_from_json,
    config_to_json,
    error_from_doc,
    error_to_doc,
)
from pelagos_bpf.agent.metrics import Stats, quantile, render
from pelagos_bpf.agent.server import parse_listen
from pelagos_bpf.errors import BpfError, CgroupError, ConfigError, UnsupportedSettings

ROOT = Path(__file__).resolve().parents[1]
C_SOURCE = ROOT / "hook" / "pelagos-bpf-hook.c"


def test_frame_round_trip() -> None:
    raw = p.frame(p.HOOK, p.hook_payload("create", b'{"id": "x"}'))
    kind, length = p.parse_header(raw[:12])
    assert (kind, length) == (p.HOOK, len(raw) - 12)
    req = p.parse_request(kind, raw[12:])
    assert (req.op, req.owner, req.stage, req.state) == ("hook", "hook", "create", b'{"id": "x"}')
    call = p.parse_request(p.CALL, p.call_payload("setup", "nri", {"pid": 3}))
    assert (call.op, call.owner, call.args) == ("setup", "nri", {"pid": 3})


def test_header_is_big_endian_as_the_c_hook_writes_it() -> None:
    assert p.frame(p.HOOK, b"auto\n") == b"PBA1\x00\x01\x00\x01\x00\x00\x00\x05auto\n"


@pytest.mark.parametrize(
    "header, message, reply_kind",
    [
        (b"XXXX\x00\x01\x00\x01\x00\x00\x00\x00", "bad magic", p.CALL_REPLY),
        (b"PBA1\x00\x02\x00\x01\x00\x00\x00\x00", "protocol version 2", p.HOOK_REPLY),
        (b"PBA1\x00\x02\x00\x02\x00\x00\x00\x00", "protocol version 2", p.CALL_REPLY),
        (b"PBA1\x00\x01\x00\x07\x00\x00\x00\x00", "unknown frame kind 0x7", p.CALL_REPLY),
        (b"PBA1\x00\x01\x80\x01\x00\x00\x00\x00", "unknown frame kind 0x8001", p.CALL_REPLY),
        (b"PBA1\x00\x01\x00\x01\x00\x10\x00\x01", "exceeds 1048576", p.HOOK_REPLY),
    ],
    ids=["magic", "version-hook", "version-call", "kind", "reply-as-request", "oversize"],
)
def test_bad_headers(header: bytes, message: str, reply_kind: int) -> None:
    with pytest.raises(p.ProtocolError, match=message) as e:
        p.parse_header(header)
    assert e.value.reply_kind == reply_kind


@pytest.mark.parametrize(
    "kind, payload, message",
    [
        (p.HOOK, b"create", "want STAGE"),
        (p.HOOK, b"prestart\n{}", "got 'prestart'"),
        (p.CALL, b"{not json", "not JSON"),
        (p.CALL, b"[1]", "JSON object"),
        (p.CALL, b'{"op": "rm -rf", "owner": "runtime"}', "op='rm -rf'"),
        (p.CALL, b'{"op": "gc", "owner": "root"}', "owner='root'"),
        (p.CALL, b'{"op": "gc", "owner": "hook", "args": []}', "args must be"),
        (p.CALL, b"[" * 100_000, "not JSON"),
    ],
    ids=["no-newline", "stage", "json", "array", "op", "owner", "args", "deep"],
)
def test_bad_requests(kind: int, payload: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=re.escape(message)):
        p.parse_request(kind, payload)


def test_replies() -> None:
    raw = p.hook_reply(2, "no such thing")
    assert p.parse_header(raw[:12], replies=True) == (p.HOOK_REPLY, len(raw) - 12)
    assert p.parse_hook_reply(raw[12:]) == (2, "no such thing")
    ok = p.parse_call_reply(p.call_ok({"a": 1})[12:])
    assert ok == {"ok": True, "result": {"a": 1}}
    err = p.error_reply(p.HOOK_REPLY, p.error_doc("AgentError", "busy"))
    assert p.parse_hook_reply(err[12:]) == (2, "pelagos-bpf agent: error: busy")
    big = p.call_ok("x" * (p.MAX_REPLY + 1))
    assert "exceeds" in p.parse_call_reply(big[12:])["error"]["message"]


def test_timeout_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(p.TIMEOUT_ENV, raising=False)
    assert p.client_timeout() == p.DEFAULT_TIMEOUT
    monkeypatch.setenv(p.TIMEOUT_ENV, "0.25")
    assert p.client_timeout() == 0.25
    for bad in ("0", "-1", "soon", "7200"):
        monkeypatch.setenv(p.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=p.TIMEOUT_ENV):
            p.client_timeout()


def test_c_hook_speaks_the_same_protocol() -> None:
    """The thin hook's constants are the module's (one protocol, two languages)."""
    src = C_SOURCE.read_text()

    def define(name: str) -> str:
        m = re.search(rf"^#define {name} (.+)$", src, re.M)
        assert m, name
        return m.group(1).strip()

    assert define("MAGIC") == f'"{p.MAGIC.decode()}"'
    assert int(define("PROTO_VERSION")) == p.VERSION
    assert int(define("KIND_HOOK"), 0) == p.HOOK
    assert int(define("KIND_HOOK_REPLY"), 0) == p.HOOK_REPLY
    assert int(define("KIND_CALL_REPLY"), 0) == p.CALL_REPLY
    assert int(define("HEADER_SIZE")) == p.HEADER.size
    assert define("MAX_PAYLOAD") == "(1u << 20)" and p.MAX_PAYLOAD == 1 << 20
    assert define("DEFAULT_SOCKET") == f'"{p.DEFAULT_SOCKET}"'
    assert int(define("DEFAULT_TIMEOUT_MS")) == p.DEFAULT_TIMEOUT * 1000
    for env in (p.SOCKET_ENV, p.TIMEOUT_ENV):
        assert f'"{env}"' in src


# ---------------------------------------------------------------- codec


def test_config_round_trip() -> None:
    cfg = CgroupConfig(
        memory_limit=1 << 28,
        cpu_quota=(50_000, 100_000),
        device_rules=[*DEFAULT_DEVICE_RULES, CgroupDeviceRule(False, "c", 1, 5, "r")],
        net_classid=0x10010,
        net_priorities=[("eth0", 5)],
        blkio_throttle_read_bps=[(8, 0, 1000)],
        rdma_limits={"mlx5_0": (10, None)},
        path="pelagos/x",
    )
    doc = json.loads(json.dumps(config_to_json(cfg)))
    assert doc["device_rules"][-1] == "deny c 1:5 r"
    assert config_from_json(doc) == cfg
    assert config_to_json(CgroupConfig()) == {}


@pytest.mark.parametrize(
    "doc, setting",
    [
        ({"memroy_limit": 1}, "config.memroy_limit"),
        ({"device_rules": "allow a"}, "device_rules"),
        ({"device_rules": ["allow q 1:1"]}, "device_rules"),
        ({"net_priorities": [5]}, "net_priorities"),
        ([], "config"),
    ],
)
def test_bad_config_names_the_key(doc: object, setting: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_json(doc)
    assert e.value.setting.startswith(setting)


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError("net_classid", 7, "minor must not be 0"),
        UnsupportedSettings([("memory_limit", "bound to v1")]),
        CgroupError(16, "rmdir /x failed: busy"),
        BpfError(1, "BPF_PROG_ATTACH", "cannot attach"),
        AgentError("overloaded", 11),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_cross_the_socket_as_themselves(exc: Exception) -> None:
    doc = json.loads(json.dumps(error_to_doc(exc)))
    back = error_from_doc(doc)
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert getattr(back, "setting", None) == getattr(exc, "setting", None)
    assert getattr(back, "errno", None) == getattr(exc, "errno", None)


def test_unknown_error_types_become_agent_errors() -> None:
    doc = error_to_doc(KeyError("boom"))
    assert doc["type"] == "AgentError"
    assert isinstance(error_from_doc({"type": "os.system", "message": "x"}), AgentError)


# ---------------------------------------------------------------- metrics


def test_parse_listen() -> None:
    assert parse_listen("unix:/run/x.sock") == ("unix", "/run/x.sock", 0)
    assert parse_listen("127.0.0.1:9464") == ("tcp", "127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("tcp", "::1", 9464)
    for bad in ("0.0.0.0:9464", "10.0.0.1:80", "127.0.0.1:0", "127.0.0.1:x", "unix:rel", "host"):
        with pytest.raises(ValueError, match="--metrics-listen"):
            parse_listen(bad)


def test_quantile() -> None:
    assert quantile([], 0.5) is None
    xs = [float(i) for i in range(1, 101)]
    assert quantile(xs, 0.5) == 50.0
    assert quantile(xs, 0.99) == 99.0
    assert quantile([3.0], 0.99) == 3.0


def test_render_parses_as_prometheus_text() -> None:
    stats = Stats()
    for s in (0.0002, 0.0004, 0.003):
        stats.observe("hook_create", s, True)
    stats.observe("setup", 0.02, False)
    stats.refuse("uid")
    held = [{"id": 7, "path": '/sys/fs/cgroup/a"b\\c', "container": "ctr-1", "features": []}]
    counters = {
        "denials": {7: {"c 1:5 r": 3}, 8: {"c 1:5 r": 9}},  # 8: not held, not exported
        "net": {7: [10, 1, None, None]},  # egress only
        "maps": [
            {
                "feature": "devices",
                "version": 2,
                "map": "dev_rules",
                "id": 5,
                "entries": 26,
                "max_entries": 262144,
            }
        ],
    }
    text = render(stats, in_flight=1, connections=2, programs=[{}], held=held, counters=counters)
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    reqs = {
        (s.labels["op"], s.labels["result"]): s.value
        for s in fams["pelagos_bpf_agent_requests"].samples
    }
    assert reqs[("hook_create", "ok")] == 3 and reqs[("setup", "failed")] == 1
    hist = {
        s.labels["le"]: s.value
        for s in fams["pelagos_bpf_agent_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["op"] == "hook_create"
    }
    assert hist["0.00025"] == 1 and hist["0.0005"] == 2 and hist["+Inf"] == 3
    (den,) = fams["pelagos_bpf_device_denials"].samples
    assert den.labels == {
        "cgroup": '/sys/fs/cgroup/a"b\\c',
        "container": "ctr-1",
        "device": "c 1:5",
        "access": "r",
    }
    assert den.value == 3
    (eg,) = fams["pelagos_bpf_net_bytes"].samples
    assert eg.value == 10 and eg.labels["direction"] == "egress"
    (fill,) = fams["pelagos_bpf_map_entries"].samples
    assert fill.value == 26 and fill.labels["map"] == "dev_rules"
    assert fams["pelagos_bpf_agent_refused"].samples[0].labels == {"reason": "uid"}
    assert fams["pelagos_bpf_agent_cgroups_held"].samples[0].value == 1


def _unit(name: str) -> dict[str, dict[str, str]]:
    import configparser

    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((ROOT / "contrib" / "systemd" / name).read_text())
    return {s: dict(cp[s]) for s in cp.sections()}


def test_systemd_units_match_the_agent() -> None:
    """Type=notify (the agent sends READY=1), the CLI's agent command, the default socket
    with the modes the agent would give it."""
    svc = _unit("pelagos-bpf-agent.service")["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["ExecStart"] == "/usr/local/bin/pelagos-bpf agent"
    assert svc["KillSignal"] == "SIGTERM"
    sock = _unit("pelagos-bpf-agent.socket")["Socket"]
    assert sock["ListenStream"] == p.DEFAULT_SOCKET
    assert (sock["SocketMode"], sock["DirectoryMode"]) == ("0600", "0700")
    assert sock["Service"] == "pelagos-bpf-agent.service"


def test_stats_add_up_the_slots_of_every_process() -> None:
    """Each process writes its own slot of one shared mapping (forked: here, the same object
    bound to each slot in turn); readers see the node: counts added, names matched even when
    each process met them in another order, latencies pooled, gauges per process."""
    import os

    stats = Stats(2)
    stats.observe("hook_create", 0.001, True)
    stats.observe("setup", 0.5, False)
    stats.refuse("uid")
    stats.set_load(3, 1, 0)
    stats.add_load(2)
    if (pid := os.fork()) == 0:  # the second process: its own slot, names in another order
        try:
            stats.bind(1)
            stats.observe("setup", 0.1, True)
            stats.observe("hook_create", 0.003, True)
            stats.observe("hook_create", 0.002, True)
            stats.refuse("uid")
            stats.refuse("cut")
            stats.add_load(1)
            stats.set_nri_registered(True)  # the main process's flag: written in slot 0
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    req = stats.requests()
    assert req["hook_create"] == {"count": 3, "failed": 0, "p50_ms": 2.0, "p99_ms": 3.0}
    assert req["setup"]["count"] == 2 and req["setup"]["failed"] == 1
    assert stats.refused() == {"uid": 2, "cut": 1}
    ok, failed, buckets, total = stats.histograms()["hook_create"]
    assert (ok, failed, sum(buckets)) == (3, 0, 3) and abs(total - 0.006) < 1e-9
    mine, theirs = stats.loads()
    assert mine["pid"] == os.getpid() and mine["connections"] == 3 and mine["load"] == 2
    assert theirs["pid"] == pid and theirs["load"] == 1 and theirs["requests"] == 3
    assert stats.load() == 2 and stats.least_load() == 1
    assert stats.nri_registered()
    stats.forget(pid)
    assert stats.loads()[1]["pid"] == 0 and stats.least_load() > 1000
    assert stats.requests()["setup"]["count"] == 2  # history stays


def test_stats_fold_ops_past_the_table_into_other() -> None:
    from pelagos_bpf.agent.metrics import MAX_OPS

    stats = Stats()
    for i in range(MAX_OPS + 5):
        stats.observe(f"op{i}", 0.001, True)
    req = stats.requests()
    assert len(req) == MAX_OPS and req["other"]["count"] == 6
    assert req["op0"]["count"] == 1
