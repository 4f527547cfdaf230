"""Guest roots without a compiler (tests/vm/roots.py): what is built, what must not be in it,
and (in a guest) that the minimal root boots with python3 and nothing to compile with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.vm import pool, qemu, roots  # noqa: E402
from tests.vm import run as vmrun  # noqa: E402
from tests.vm.pytest_guests import Context, guest_job, wait  # noqa: E402


def test_only_installed_packages_count() -> None:
    status = (
        "Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1\n\n"
        "Package: gcc-12\nStatus: deinstall ok config-files\n\n"
        "Package: kmod\nStatus: install ok installed\n"
    )
    assert roots.installed_packages(status) == ["python3", "kmod"]


def test_a_toolchain_in_any_form_is_forbidden_but_runtime_libraries_are_not() -> None:
    installed = [
        "gcc-12", "gcc", "cpp-12", "clang-14", "llvm-14", "libllvm15", "libclang1-14",
        "python3-bpfcc", "libbpfcc", "libbpf1", "bpfcc-tools", "linux-headers-6.1.0-57-amd64",
        "libc6-dev", "python3.11-dev",
        "libgcc-s1", "gcc-12-base", "libstdc++6", "python3", "python3.11", "python3-venv",
        "libpython3.11-stdlib", "libc6", "busybox", "kmod", "libcpp-dummy",
    ]  # fmt: skip
    bad = roots.forbidden_in(installed, roots.NO_TOOLCHAIN)
    assert bad == sorted(installed[:14])


def test_the_root_is_rebuilt_when_its_package_list_changes() -> None:
    a = roots.RootSpec("bookworm", ("python3", "kmod"), roots.NO_TOOLCHAIN, "")
    same = roots.RootSpec("bookworm", ("kmod", "python3"), roots.NO_TOOLCHAIN, "other words")
    more = roots.RootSpec("bookworm", ("python3", "kmod", "curl"), roots.NO_TOOLCHAIN, "")
    assert a.key() == same.key() != more.key()
    assert a.key() != roots.RootSpec("trixie", a.packages, a.forbidden, "").key()


def test_mmdebstrap_uses_the_systems_archive_and_keyring(tmp_path: Path) -> None:
    spec = roots.ROOTS["minimal"]
    argv = roots.mmdebstrap_argv(spec, tmp_path / "root", "http://mirror.example/debian")
    assert argv[0] == "unshare" and "--kill-child" in argv and "--variant=essential" in argv
    assert f"--include={','.join(spec.packages)}" in argv
    assert argv[-3:] == [
        "bookworm",
        str(tmp_path / "root"),
        f"deb [signed-by={roots.KEYRING}] http://mirror.example/debian bookworm main",
    ]
    assert not roots.forbidden_in(list(spec.packages), spec.forbidden)


def test_unknown_root_is_a_message_and_host_is_the_hosts_root() -> None:
    assert roots.ensure_root(roots.HOST) == Path("/")
    with pytest.raises(roots.RootError, match="unknown root 'nope': use host or one of minimal"):
        roots.ensure_root("nope")


def test_on_another_root_every_needed_dir_is_shared_itself(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    paths = [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "c"]
    assert qemu.extra_mounts(paths, root=tmp_path / "root") == [tmp_path / "a", tmp_path / "c"]


def test_a_job_on_a_root_without_the_hosts_python_runs_a_command_only() -> None:
    job = vmrun.job_script(Path("/src"), None, None, "python3 -V", "6.12")
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in job
    assert "exec /bin/sh -c 'python3 -V'" in job
    with pytest.raises(ValueError, match="pytest runs only on the host root"):
        vmrun.job_script(Path("/src"), None, ["-k", "x"], None, "6.12")


# ---- in a guest (matrix): the minimal root boots and has nothing to compile with ----

PROBE = (
    "set -e; python3 -c 'import ctypes, venv, ensurepip; print(\"python ok\")'; "
    'for t in gcc cc clang llc; do if command -v $t; then echo "found $t"; exit 1; fi; done; '
    "if [ -e /usr/lib/python3/dist-packages/bcc ]; then echo 'found bcc'; exit 1; fi; "
    "if ls /usr/lib/x86_64-linux-gnu/libbpf.so* 2>/dev/null; then exit 1; fi; "
    f"test -f {vmrun.PROJECT}/pyproject.toml && echo 'project ok'"
)


@guest_job("minimal-root")
def _minimal_root(ctx: Context) -> pool.Job:
    def job(log: pool.Log) -> vmrun.KernelResult:
        return vmrun.run_kernel("6.12", None, cmd=PROBE, root="minimal", log=log)

    return job


@pytest.mark.matrix
@pytest.mark.guest("minimal-root")
def test_minimal_root_boots_with_python_and_no_toolchain(
    guest_pool: pool.GuestPool, request: pytest.FixtureRequest
) -> None:
    res = wait(guest_pool, request)
    vmrun.report(res)
    assert res.ok, f"the probe failed: {res.summary()}"
    assert "python ok" in res.run.output and "project ok" in res.run.output
