"""The kernel matrix: the whole suite (`-m "not matrix"`) inside QEMU guests of Debian kernels.

Why: this host's cgroups are hybrid, so controller effects (`v2_controllers` tests) can only be
proven on a pure cgroup v2 kernel, and the BPF features must hold on the kernels people run.
The host's own kernel is the ordinary run; `-m "not matrix"` deselects this file.
Kernels: $PELAGOS_MATRIX_KERNELS (space-separated) or the runner's defaults; extra guest pytest
args: $PELAGOS_MATRIX_PYTEST_ARGS.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shlex
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `tests.vm` is importable however pytest was started
    sys.path.insert(0, str(_ROOT))

from tests.vm import kernels, qemu  # noqa: E402
from tests.vm import run as vmrun  # noqa: E402

KERNELS = os.environ.get("PELAGOS_MATRIX_KERNELS", " ".join(kernels.DEFAULT_KERNELS)).split()
GUEST_ARGS = shlex.split(os.environ.get("PELAGOS_MATRIX_PYTEST_ARGS", ""))


@pytest.fixture(scope="module")
def bpf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """BPF bytecode compiled once on the host, copied into each guest (no bcc under TCG)."""
    if os.environ.get("PELAGOS_VM_KERNEL"):
        pytest.skip("already inside a matrix guest")
    missing = qemu.missing_tools()
    if missing:
        pytest.skip(f"cannot boot QEMU guests here, missing: {', '.join(missing)}")
    d = tmp_path_factory.mktemp("bpf") / vmrun.BPF_CACHE_NAME
    d.mkdir()
    yield d if vmrun.prefill_bpf_cache(vmrun.venv_python(), d) else None


def _show(request: pytest.FixtureRequest, line: str) -> None:
    """Write past pytest's capture: the per-kernel counts belong in every run's output."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or cap is None:
        print(line)
        return
    with cap.global_and_fixture_disabled():
        tr.write_line("")
        tr.write_line(line)


@pytest.mark.matrix
@pytest.mark.parametrize("kernel", KERNELS)
def test_guest_suite(kernel: str, bpf_cache: Path | None, request: pytest.FixtureRequest) -> None:
    res = vmrun.run_kernel(kernel, GUEST_ARGS, bpf_cache=bpf_cache)
    vmrun.report(res)  # captured: shown when the test fails
    request.node.user_properties.append(("matrix", res.summary()))
    _show(request, f"[matrix] {res.summary()}")
    r = res.run
    assert r.started, f"{kernel}: the guest never started the suite (retried once)"
    assert r.status is not None, f"{kernel}: guest crashed or timed out during the suite"
    assert r.status == 0, f"{kernel}: guest pytest exited {r.status}: {res.counts}"
    assert res.counts.get("passed", 0) > 0, f"{kernel}: no test passed in the guest"


# ---- the runner's pure parts (fast, run on every host) ----


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    img = bytearray((setup_sects + 1) * 512 + 64)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", img, 0x248, 64, len(payload))
    return bytes(img) + payload + b"\x00\x10\x00\x00"  # the build's appended size word


@pytest.mark.parametrize("compress", ["xz", "gzip"])
def test_extract_vmlinux_follows_the_setup_header(compress: str) -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 40
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ) if compress == "xz" else gzip.compress(elf)
    assert kernels.extract_vmlinux(_bzimage(payload)) == elf
    with pytest.raises(kernels.KernelError, match="not a bzImage"):
        kernels.extract_vmlinux(b"\0" * 4096)
    with pytest.raises(kernels.KernelError, match="unknown payload"):
        kernels.extract_vmlinux(_bzimage(b"\x01\x02\x03\x04" * 8))


def test_module_files_orders_dependencies_and_skips_builtins(tmp_path: Path) -> None:
    mdir = tmp_path / "lib" / "modules" / "9.9.9"
    mdir.mkdir(parents=True)
    (mdir / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")
    (mdir / "modules.dep").write_text(
        "kernel/fs/fuse/virtiofs.ko.xz: kernel/drivers/virtio/virtio.ko.xz "
        "kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko.xz\n"
        "kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/fs/fuse/fuse.ko.xz:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
    )
    k = kernels.Kernel("t", "linux-image-t", tmp_path, "9.9.9")
    got = [p.name for p in kernels.module_files(k, ("virtiofs",))]
    assert got == ["fuse.ko.xz", "virtio.ko.xz", "virtiofs.ko.xz"]
    with pytest.raises(kernels.KernelError, match="nope"):
        kernels.module_files(k, ("nope",))


def test_initramfs_is_a_valid_newc_archive(tmp_path: Path) -> None:
    from tests.vm.initramfs import _Newc

    w = _Newc()
    w.dir("bin")
    w.file("bin/x", b"abc", 0o755)
    w.symlink("bin/sh", "busybox")
    data = w.finish()
    names, pos = [], 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        start = pos + 110
        name = data[start : start + namesize - 1].decode()
        body = start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            break
        names.append((name, oct(fields[1]), data[body : body + filesize]))
        pos = body + filesize + (-filesize % 4)
    assert names == [
        ("bin", "0o40755", b""),
        ("bin/x", "0o100755", b"abc"),
        ("bin/sh", "0o120777", b"busybox"),
    ]


def test_junit_counts_and_job_script() -> None:
    xml = (
        b'<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10">'
        b"</testsuite></testsuites>"
    )
    assert vmrun.parse_junit(xml) == {"passed": 4, "skipped": 3, "failed": 2, "errors": 1}
    assert vmrun.parse_junit(None) == {}
    job = vmrun.job_script(Path("/src/my proj"), Path("/v/bin/python"), ["-k", "a b"], None, "6.1")
    assert "cd '/src/my proj'" in job
    assert "-m 'not matrix'" in job and "'a b'" in job and "PELAGOS_VM_KERNEL=6.1" in job
