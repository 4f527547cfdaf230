"""The containerd guest: its pure parts here, and (marked `matrix`) one boot that runs
tests/test_cri_guest.py and then tests/test_nri_guest.py (our NRI plugin, started by that file
itself) inside it against a real containerd.

Why a separate boot: the kernel matrix's guests run no container runtime; this one starts
containerd 2.1.9 (tests/vm/containerd.py) before pytest. One boot for both files: a boot and
the node's start are a third of the run. `-m "not matrix"` deselects the boot.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shlex
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `tests.vm` is importable however pytest was started
    sys.path.insert(0, str(_ROOT))

from tests.vm import containerd, images, pool  # noqa: E402
from tests.vm import run as vmrun  # noqa: E402
from tests.vm.pytest_guests import Context, guest_job, show, wait  # noqa: E402

GUEST_TESTS = ["tests/test_cri_guest.py", "tests/test_nri_guest.py"]


@guest_job("containerd")
def _containerd_suite(ctx: Context) -> pool.Job:
    def job(log: pool.Log) -> vmrun.KernelResult:
        return vmrun.run_kernel("6.12", GUEST_TESTS, node="containerd", log=log)

    return job


@pytest.mark.matrix
@pytest.mark.guest("containerd", cost=6)
def test_cri_guest_suite(guest_pool: pool.GuestPool, request: pytest.FixtureRequest) -> None:
    try:
        res = wait(guest_pool, request)
    except vmrun.RUNNER_ERRORS as e:
        pytest.fail(f"containerd guest: {e}", pytrace=False)
    vmrun.report(res)  # captured: shown when the test fails
    show(request.config, f"[containerd] {res.summary()}")
    r = res.run
    assert r.started, "the guest never started the job (retried once)"
    assert r.status is not None, "guest crashed or timed out"
    assert r.status == 0, f"guest pytest exited {r.status}: {res.counts}"
    assert res.counts.get("passed", 0) > 0 and res.counts.get("skipped", 0) == 0, res.counts


# ---- pure parts ----


def _members(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            f = t.extractfile(m) if m.isfile() else None
            out[m.name] = (m, f.read() if f else b"")
    return out


def test_images_are_a_deterministic_oci_layout_sharing_one_layer() -> None:
    layer = images.layer_tar(b"\x7fELF busybox", ["sh", "sleep", "ping"])
    files = _members(layer)
    assert files["bin/busybox"][0].mode == 0o755 and files["bin/busybox"][1] == b"\x7fELF busybox"
    assert files["bin/ping"][0].issym() and files["bin/ping"][0].linkname == "busybox"
    assert files["tmp"][0].mode == 0o1777 and b"root:x:0:0" in files["etc/passwd"][1]
    assert {m.mtime for m, _ in files.values()} == {0}

    archive = images.oci_archive(layer, images.CONFIGS)
    assert archive == images.oci_archive(layer, images.CONFIGS)  # a cache key can name it
    blobs = {
        name.removeprefix("blobs/sha256/"): data
        for name, (m, data) in _members(archive).items()
        if m.isfile() and name.startswith("blobs/")
    }
    for digest, data in blobs.items():
        assert hashlib.sha256(data).hexdigest() == digest
    top = _members(archive)
    assert json.loads(top["oci-layout"][1]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(top["index.json"][1])
    refs = {}
    for desc in index["manifests"]:
        manifest = json.loads(blobs[desc["digest"].removeprefix("sha256:")])
        config = json.loads(blobs[manifest["config"]["digest"].removeprefix("sha256:")])
        (lay,) = manifest["layers"]
        assert lay["mediaType"] == images.MT_LAYER
        gz = blobs[lay["digest"].removeprefix("sha256:")]
        diff_id = "sha256:" + hashlib.sha256(gzip.decompress(gz)).hexdigest()
        assert config["rootfs"]["diff_ids"] == [diff_id]
        assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
        refs[desc["annotations"]["io.containerd.image.name"]] = config["config"]
    assert refs[images.PAUSE_IMAGE]["Entrypoint"] == ["/bin/sleep", "inf"]
    assert refs[images.BUSYBOX_IMAGE]["Cmd"] == ["/bin/sh"]
    assert len(blobs) == 1 + 2 * 2  # one shared layer, a config and a manifest per image


def test_containerd_config_turns_on_what_the_nri_tests_need() -> None:
    cfg = tomllib.loads(containerd.config_toml())
    assert cfg["version"] == 3 and cfg["grpc"]["address"] == str(containerd.SOCKET)
    assert cfg["root"] == "/var/lib/containerd"  # a tmpfs in the guest (overlayfs snapshots)
    p = cfg["plugins"]
    nri = p["io.containerd.nri.v1.nri"]
    assert nri["disable"] is False and nri["socket_path"] == "/var/run/nri/nri.sock"
    assert (nri["plugin_registration_timeout"], nri["plugin_request_timeout"]) == ("5s", "2s")
    assert p["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == images.PAUSE_IMAGE
    assert p["io.containerd.cri.v1.images"]["snapshotter"] == "overlayfs"
    rt = p["io.containerd.cri.v1.runtime"]
    runc = rt["containerd"]["runtimes"]["runc"]
    assert runc["pod_annotations"] == ["io.pelagos-bpf.*"]
    assert runc["options"] == {"BinaryName": "/usr/sbin/runc", "SystemdCgroup": False}
    assert rt["cni"]["conf_dir"] == "/run/pelagos-node/cni"
    sd = tomllib.loads(containerd.config_toml(systemd_cgroup=True, nri_request_timeout="1s"))
    sd_rt = sd["plugins"]["io.containerd.cri.v1.runtime"]
    assert sd_rt["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    assert sd["plugins"]["io.containerd.nri.v1.nri"]["plugin_request_timeout"] == "1s"


def test_pods_get_a_bridge_network() -> None:
    conf = json.loads(containerd.cni_conflist())
    (bridge,) = conf["plugins"]
    assert bridge["type"] == "bridge" and bridge["bridge"] == containerd.BRIDGE
    assert bridge["ipMasq"] is False  # no iptables in the guest
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]]


def test_node_job_starts_containerd_then_the_setup_then_the_command() -> None:
    node = containerd.Node(Path("/c/containerd_2.1.9"), Path("/c/images-x.tar"))
    lines = containerd.job_lines(node, "pelagos-bpf agent --nri &")
    job = vmrun.job_script(Path("/src"), Path("/v/bin/python"), None, "true", "6.12", lines)
    body = job.splitlines()
    start = body.index(
        "python -m tests.vm.containerd start --tree /c/containerd_2.1.9 --images /c/images-x.tar"
    )
    setup = body.index("/bin/sh -c " + shlex.quote("pelagos-bpf agent --nri &"))
    assert start < setup < body.index("exec /bin/sh -c true")
    assert "export PELAGOS_VM_NODE=containerd" in body
    assert "export PELAGOS_CRI_IMAGE=localhost/pelagos-bpf/busybox:1" in body
    assert body.index("export PELAGOS_VM_KERNEL=6.12") < start  # after the runner's env
    assert "--node-setup needs --node" in _main_error(["--node-setup", "x", "--cmd", "true"])


def _main_error(argv: list[str]) -> str:
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        vmrun.main(argv)
    return err.getvalue()


def test_wait_plugin_reads_containerds_log_after_a_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "containerd.log"
    monkeypatch.setattr(containerd, "log_path", lambda: log)
    assert containerd.log_offset() == 0
    msg = 'plugin \\"10-pelagos-bpf\\" connected and synchronized'
    line = f'time="2026-12-07T13:00:00Z" level=info msg="{msg}"\n'
    log.write_text(line)
    containerd.wait_plugin("pelagos-bpf")
    containerd.wait_plugin("10-pelagos-bpf")
    mark = containerd.log_offset()
    with pytest.raises(containerd.NodeError, match="'pelagos-bpf' did not register"):
        containerd.wait_plugin("pelagos-bpf", since=mark, timeout=0.2)
    with pytest.raises(containerd.NodeError):
        containerd.wait_plugin("pelagos", timeout=0.2)  # a prefix is another plugin
