"""The kernel matrix: the whole suite (`-m "not matrix"`) inside QEMU guests of Debian kernels.

Why: this host's cgroups are hybrid, so controller effects (`v2_controllers` tests) can only be
proven on a pure cgroup v2 kernel, and the BPF features must hold on the kernels people run.
The host's own kernel is the ordinary run; `-m "not matrix"` deselects this file.
Kernels: $PELAGOS_MATRIX_KERNELS (space-separated) or the runner's defaults; extra guest pytest
args: $PELAGOS_MATRIX_PYTEST_ARGS; the middle kernels run a declared subset unless
$PELAGOS_MATRIX_FULL=1 (see `tests.vm.run.guest_args`). The guests run in the session's pool,
up to $PELAGOS_MATRIX_JOBS at once, after the host tests (tests/vm/pytest_guests.py).
"""

from __future__ import annotations

import gzip
import lzma
import os
import shlex
import struct
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `tests.vm` is importable however pytest was started
    sys.path.insert(0, str(_ROOT))

from tests.vm import kernels, pool, qemu  # noqa: E402
from tests.vm import run as vmrun  # noqa: E402
from tests.vm.pytest_guests import Context, guest_job, show, wait  # noqa: E402

KERNELS = os.environ.get("PELAGOS_MATRIX_KERNELS", " ".join(kernels.DEFAULT_KERNELS)).split()
GUEST_ARGS = shlex.split(os.environ.get("PELAGOS_MATRIX_PYTEST_ARGS", ""))


@guest_job("matrix")
def _kernel_suite(ctx: Context, kernel: str) -> pool.Job:
    """Boot `kernel` and run its guest suite (the guests load the package's bytecode from the
    checkout, shared read-only: nothing to prepare)."""

    def job(log: pool.Log) -> vmrun.KernelResult:
        return vmrun.run_kernel(kernel, vmrun.guest_args(kernel, GUEST_ARGS), log=log)

    return job


# A guest's minutes under TCG on an idle 2-core machine (orders the pool: longest first).
COST = {"5.10": 9, "6.1": 7, "6.12": 10, "sid": 12}


@pytest.mark.matrix
@pytest.mark.parametrize(
    "kernel",
    [pytest.param(k, marks=pytest.mark.guest("matrix", cost=COST.get(k, 8))) for k in KERNELS],
)
def test_guest_suite(
    kernel: str, guest_pool: pool.GuestPool, request: pytest.FixtureRequest
) -> None:
    try:
        res = wait(guest_pool, request)  # every guest's start line and heartbeats shown
    except vmrun.RUNNER_ERRORS as e:
        pytest.fail(f"{kernel}: {e}", pytrace=False)
    vmrun.report(res)  # captured: shown when the test fails
    request.node.user_properties.append(("matrix", res.summary()))
    show(request.config, f"[matrix] {res.summary()}")
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


def test_split_kernel_parts_come_from_the_image_packages_depends() -> None:
    from tests.vm.apt import parse_depends

    sid = parse_depends(
        "linux-image-7.2.13+deb14-amd64\n"
        "  PreDepends: linux-base\n |Depends: dracut\n |Depends: initramfs-tools\n"
        "  Depends: <linux-initramfs-tool>\n    dracut\n"
        "  Depends: linux-base-7.2.13+deb14-amd64\n  Depends: linux-binary-7.2.13+deb14-amd64\n"
        "  Depends: linux-modules-7.2.13+deb14-amd64\n  Breaks: initramfs-tools\n"
        "  Recommends: apparmor\n"
    )
    assert sid == [
        "dracut",
        "initramfs-tools",
        "linux-initramfs-tool",
        "linux-base-7.2.13+deb14-amd64",
        "linux-binary-7.2.13+deb14-amd64",
        "linux-modules-7.2.13+deb14-amd64",
    ]
    assert kernels.split_parts("linux-image-7.2.13+deb14-amd64", sid) == sid[3:]
    # classic one-package kernel: its Depends name no linux-*-<same release> package
    classic = ["kmod", "linux-base", "initramfs-tools", "linux-base-7.2.13+deb14-amd64"]
    assert kernels.split_parts("linux-image-5.10.0-32-amd64", classic) == []
    # the cloud flavour's parts are not the generic one's
    assert kernels.split_parts("linux-image-7.2.13+deb14-cloud-amd64", sid) == []


def test_private_apt_uses_the_systems_archive_and_never_its_state(tmp_path: Path) -> None:
    from tests.vm.apt import Apt, archive_uri

    d822 = tmp_path / "sources.list.d"
    d822.mkdir()
    (d822 / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\n# a comment: here\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm\nComponents: main\n"
    )
    assert archive_uri((tmp_path / "none.list", d822)) == "http://mirror.example/debian"
    one = tmp_path / "sources.list"
    one.write_text("# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n")
    assert archive_uri((one,)) == "http://m.example/debian"
    assert archive_uri((tmp_path / "missing",)) == "http://deb.debian.org/debian"

    opts = Apt("sid", tmp_path / "apt").options()
    assert f"Dir::State::Lists={tmp_path / 'apt' / 'sid' / 'lists'}" in opts
    assert "Dir::Etc::SourceParts=/dev/null" in opts  # never the system's sources
    assert "Dir::State::status=/dev/null" in opts  # the host's installed kernel is no candidate
    assert not any("Dir::" in o for o in Apt(None, tmp_path / "apt").options())


def test_unknown_kernel_is_a_message() -> None:
    with pytest.raises(kernels.KernelError, match=r"unknown kernel 'nope': use one of 5\.10"):
        kernels.resolve("nope")
    assert set(kernels.DEFAULT_KERNELS) <= set(kernels.KERNELS)
    assert {"5.10", "5.10-cloud", "sid", "6.12-cloud", "6.1-cloud"} <= set(kernels.KERNELS)


def test_heartbeat_reads_the_last_line_of_a_growing_log(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    assert qemu.last_line(log) == ""
    log.write_text("=== test session starts ===\ntests/test_a.py ....\n\n")
    assert qemu.last_line(log) == "tests/test_a.py ...."
    with log.open("a") as f:
        f.write("tests/test_b.py " + "." * 5000)  # a long line still in progress
    assert qemu.last_line(log, limit=20) == "." * 20


def test_guests_run_the_declared_kernel_suite_and_user_args_win() -> None:
    suite = list(vmrun.KERNEL_SUITE)
    assert vmrun.guest_args("5.10", None, full=False) == suite
    assert vmrun.guest_args("sid", [], full=False) == suite
    middle = [*vmrun.SUBSET_ARGS, *suite]
    assert vmrun.guest_args("6.1", None, full=False) == middle
    assert vmrun.guest_args("6.12", None, full=False) == [*middle, *vmrun.RUNTIME_TESTS]
    assert vmrun.guest_args("6.12", None, full=True) == []
    assert vmrun.guest_args("6.1", ["-k", "memory"], full=False) == ["-k", "memory"]
    # every declared file exists, and the deselected test too (a rename would silently drop it)
    for f in (*suite, *vmrun.RUNTIME_TESTS):
        assert (_ROOT / f).is_file(), f
    path, _, func = vmrun.SUBSET_ARGS[1].partition("::")
    assert f"def {func}(" in (_ROOT / path).read_text()
