"""Every bad hook input is one clear message: exit 2 at create, a warning under best-effort
and at poststop, never a traceback (issue 23, findings 7 and 8). No root: each input is
refused before the hook looks at a cgroup.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hook_helpers import HOOK, LEAN

from pelagos_bpf.ocihook import inputs, run_hook
from pelagos_bpf.ocihook.request import A_NAMESPACE, HookError, pod_namespace
from pelagos_bpf.policy import builtin

STATE = {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 42}
DEEP = "[" * 100_000 + "]" * 100_000


def nested(depth: int) -> Any:
    doc: Any = "x"
    for _ in range(depth):
        doc = {"a": doc}
    return doc


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    write_config(b, {})
    return b


def write_config(bundle: Path, cfg: Any, raw: bytes | None = None) -> None:
    (bundle / "config.json").write_bytes(raw if raw is not None else json.dumps(cfg).encode())


def state_text(bundle: Path, **over: Any) -> str:
    return json.dumps({**STATE, "bundle": str(bundle), **over})


def run(raw: str | bytes, stage: str = "auto") -> Any:
    return run_hook(raw, stage, runtime="runc", policy=builtin())


# ---------------------------------------------------------------- bounded, strict JSON


def test_json_depth_is_limited_without_recursion_error() -> None:
    inputs.loads(json.dumps(nested(inputs.MAX_DEPTH)), "x")
    for doc in (json.dumps(nested(inputs.MAX_DEPTH + 1)), DEEP, '{"a":' * 50_000):
        with pytest.raises(HookError, match=r"x: (JSON nested more than 64 deep|not valid JSON)"):
            inputs.loads(doc, "x")


def test_json_strictness() -> None:
    # brackets inside strings count toward the walk's trigger, never toward the depth
    assert inputs.loads(json.dumps({"s": "[{" * 100}), "x") == {"s": "[{" * 100}
    with pytest.raises(HookError, match="'k' appears twice"):
        inputs.loads('{"a": {"k": 1, "k": 2}}', "x")
    with pytest.raises(HookError, match="not UTF-8"):
        inputs.loads(b'{"a": "\xff"}', "x")
    with pytest.raises(HookError, match="more than 4194304 bytes"):
        inputs.loads(b" " * (inputs.MAX_BYTES + 1), "x")


def test_config_json_only_from_a_bounded_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would hang forever
    link = tmp_path / "link"
    link.symlink_to("/dev/zero")  # an endless read
    big = tmp_path / "big"
    big.write_bytes(b" " * 100)
    for path, why in (
        (fifo, "not a regular file"),
        (link, "is a symlink"),
        (Path("/dev/zero"), "not a regular file"),
        (tmp_path, "not a regular file"),
    ):
        with pytest.raises(HookError, match=why):
            inputs.read_regular_file(str(path), "config.json")
    with pytest.raises(HookError, match="100 bytes, more than 10"):
        inputs.read_regular_file(str(big), "config.json", limit=10)
    assert inputs.read_regular_file(str(tmp_path / "absent"), "config.json") is None


# ---------------------------------------------------------------- run_hook never raises

CONFIG_CASES = [
    ({"annotations": ["io.pelagos-bpf.devices.audit"]}, "config.json annotations: want an object"),
    ({"annotations": {"io.pelagos-bpf.net.classid": 1}}, "want a string, not int"),
    ({"linux": []}, "linux=[]: must be a JSON object"),
    ({"linux": {"resources": []}}, "linux.resources=[]: must be a JSON object"),
    ({"annotations": {"io.pelagos-bpf.net.priorities": "eth0=\u00b2"}}, "net.priorities"),
    ({"annotations": {"io.pelagos-bpf.net.classid": "1:10001"}}, "classid='1:10001'"),
    ({"annotations": {"io.pelagos-bpf.devices": "allow c \uff11:\uff11\uff11"}}, "ASCII"),
    ({"annotations": {"io.pelagos-bpf.devices": "deny c 1:5;" * 20_000}}, "more than 131072"),
    (
        {"annotations": {"io.pelagos-bpf.devices.audit": "true"}, "linux": {"devices": 5}},
        "linux.devices=5: must be a list",
    ),
    (
        {"annotations": {"io.pelagos-bpf.devices.audit": "true"}, "linux": {"devices": [7]}},
        "linux.devices[0]=7",
    ),
    (
        {
            "annotations": {"io.pelagos-bpf.devices.audit": "true"},
            "linux": {"resources": {"devices": {"allow": False}}},
        },
        "linux.resources.devices",
    ),
    ({"annotations": {A_NAMESPACE: "Kube_System"}}, "not a Kubernetes namespace name"),
    (nested(80), "nested more than 64 deep"),
    ([], "not a JSON object"),
]


@pytest.mark.parametrize("cfg, message", CONFIG_CASES)
def test_bad_config_is_one_clear_error(bundle: Path, cfg: Any, message: str) -> None:
    write_config(bundle, cfg)
    res = run(state_text(bundle))
    assert (res.code, len(res.errors)) == (2, 1), res
    assert message in res.errors[0] and "internal error" not in res.errors[0], res.errors
    assert len(res.errors[0]) < 2100  # the 120 KiB annotation is not echoed whole
    be = run(state_text(bundle, annotations={"io.pelagos-bpf.best-effort": "true"}))
    assert (be.code, be.errors) == (0, []) and "best-effort" in be.warnings[-1], be


@pytest.mark.parametrize(
    "raw, message",
    [
        (DEEP, "nested more than 64 deep"),
        (json.dumps({**STATE, "bundle": "/b", "annotations": nested(70)}), "nested more"),
        (json.dumps({**STATE, "bundle": "/b", "annotations": ["a"]}), "state.annotations"),
        (json.dumps({**STATE, "bundle": "/b", "annotations": {"k": 1}}), "state.annotations['k']"),
        (json.dumps({**STATE, "bundle": "/b", "pid": "42"}), "state.pid"),
        ('{"id": "a", "id": "b"}', "appears twice"),
        ("[1, 2", "not valid JSON"),
        (" " * (inputs.MAX_BYTES + 1), "more than 4194304 bytes"),
    ],
)
def test_bad_state_is_an_error_at_create_and_a_warning_at_poststop(raw: str, message: str) -> None:
    res = run(raw)
    assert (res.code, len(res.errors)) == (2, 1) and message in res.errors[0], res
    assert "internal error" not in res.errors[0]
    res = run(raw, "poststop")
    assert (res.code, res.errors) == (0, []) and message in res.warnings[0], res


def test_namespace_cannot_be_spoofed() -> None:
    """Only config.json's exact `io.kubernetes.pod.namespace` counts (CRI-O writes it after
    the pod's annotations); lookalike keys do not, and a state that disagrees is refused."""
    assert pod_namespace({}, {A_NAMESPACE: "tenant"}) == "tenant"
    assert pod_namespace({A_NAMESPACE: "tenant"}, {A_NAMESPACE: "tenant"}) == "tenant"
    for lookalike in (A_NAMESPACE.upper(), A_NAMESPACE + " ", "io.kubernetes.pod.namespace\u200b"):
        assert pod_namespace({lookalike: "kube-system"}, {lookalike: "kube-system"}) is None
    for state, config in (
        ({A_NAMESPACE: "kube-system"}, {A_NAMESPACE: "tenant"}),
        ({A_NAMESPACE: "kube-system"}, {}),
        ({}, {A_NAMESPACE: "kube-system\u200b"}),
    ):
        with pytest.raises(HookError, match=A_NAMESPACE):
            pod_namespace(state, config)


def test_namespace_disagreement_fails_the_create(bundle: Path) -> None:
    write_config(bundle, {"annotations": {A_NAMESPACE: "tenant"}})
    res = run(state_text(bundle, annotations={A_NAMESPACE: "kube-system"}))
    assert (
        res.code == 2
        and "the OCI state says 'kube-system', config.json 'tenant'" in (res.errors[0])
    )


# ---------------------------------------------------------------- the executables


@pytest.mark.parametrize("argv", [HOOK, LEAN], ids=["cli", "python-m"])
def test_entry_points_never_print_a_traceback(tmp_path: Path, argv: list[str]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    env = {**os.environ, "PELAGOS_BPF_HOOK_STATE": str(tmp_path / "state")}

    def hook(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
        )

    os.mkfifo(bundle / "config.json")
    cases = [
        (state_text(bundle), (), 2, "not a regular file"),  # the FIFO: refused, no hang
        (DEEP, (), 2, "nested more than 64 deep"),
        (DEEP, ("poststop",), 0, "nested more than 64 deep"),
        (state_text(bundle, status="stopped", annotations=["x"]), (), 2, "state.annotations"),
        (state_text(bundle, status="stopped", annotations=["x"]), ("poststop",), 0, "want an"),
    ]
    for stdin, args, code, message in cases:
        r = hook(stdin, *args)
        assert r.returncode == code and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    (bundle / "config.json").unlink()
    (bundle / "config.json").symlink_to("/dev/zero")
    r = hook(state_text(bundle))
    assert r.returncode == 2 and "is a symlink" in r.stderr, r.stderr
    (bundle / "config.json").unlink()
    write_config(bundle, {"annotations": {"io.pelagos-bpf.net.priorities": "eth0=\u00b2"}})
    r = hook(state_text(bundle))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "io.pelagos-bpf.net.priorities" in r.stderr
