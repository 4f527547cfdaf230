"""The CRI test client's pure parts: its generated code is current, the subset check works,
and the shell front end parses what the NRI tests pass. (Its real use: test_cri_guest.py.)"""

from __future__ import annotations

import pytest

pytest.importorskip("grpc_tools", reason="pip install -e '.[test]' (grpcio-tools)")

from google.protobuf import descriptor_pb2 as dpb

from tests.cri import __main__ as cli
from tests.cri import client, regen
from tests.cri import cri_pb2 as pb


def test_generated_code_is_current() -> None:
    committed = dpb.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert regen.compiled() == committed, "cri.proto changed: run `python -m tests.cri.regen`"


def test_subset_check_names_a_renumbered_field() -> None:
    upstream = regen.compiled()
    assert regen.differences(regen.compiled(), upstream) == []
    mine = regen.compiled()
    (image,) = [m for m in mine.message_type if m.name == "Image"]
    (size,) = [f for f in image.field if f.name == "size"]
    size.number = 5
    mine.message_type.add(name="NotUpstream")
    assert regen.differences(mine, upstream) == [
        "Image.size: (5, 1, 4, '') upstream (4, '')",
        "NotUpstream: not upstream",
    ]


def test_method_paths_are_the_runtimes() -> None:
    path, req, resp = client._method("RuntimeService", "RunPodSandbox")
    assert path == "/runtime.v1.RuntimeService/RunPodSandbox"
    assert (req, resp) == (pb.RunPodSandboxRequest, pb.RunPodSandboxResponse)
    assert (
        client._method("ImageService", "ImageStatus")[0] == "/runtime.v1.ImageService/ImageStatus"
    )


def test_run_pod_arguments() -> None:
    args = cli.parser().parse_args(
        ["run-pod", "--annotation", "io.pelagos-bpf.net.classid=1:10", "--annotation", "a=b=c",
         "--namespace", "team-a", "--host-network", "--", "sh", "-c", "sleep 1"]
    )  # fmt: skip
    assert cli._pairs(args.annotation, "--annotation") == {
        "io.pelagos-bpf.net.classid": "1:10",
        "a": "b=c",
    }
    assert (args.namespace, args.host_network, args.command) == (
        "team-a",
        True,
        ["sh", "-c", "sleep 1"],
    )
    ex = cli.parser().parse_args(["exec", "abc", "--", "ls", "-l"])
    assert (ex.container, ex.command) == ("abc", ["ls", "-l"])
    with pytest.raises(SystemExit, match="'novalue' is not KEY=VALUE"):
        cli._pairs(["novalue"], "--annotation")


def test_pod_cgroup_parent_and_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.cgroup_parent_for("abc") == "/pelagos-cri/podabc"
    monkeypatch.delenv(client.SOCKET_ENV, raising=False)
    assert client.socket_path() == "/run/containerd/containerd.sock"
    monkeypatch.setenv(client.SOCKET_ENV, "/x.sock")
    assert client.socket_path() == "/x.sock" and client.socket_path("/y") == "/y"


def test_a_missing_socket_is_an_error_not_a_wait(tmp_path: object) -> None:
    with client.Client("/nonexistent/cri.sock") as c, pytest.raises(client.CriError) as e:
        c.wait_ready("any")
    assert str(e.value) == "wait_ready: ERROR: no CRI socket at /nonexistent/cri.sock"
