"""Planted bytecode and squatted pins, tried for real (root, setpriv, a private bpffs).

Each attack is what a reviewer did on this machine (issue 8): an unprivileged user plants an
allow-all program where root's device setup looks for bytecode, or squats the pin name. Setup
runs in a fresh process (as a runtime would), so nothing this test process loaded is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from device_helpers import probe

from pelagos_bpf import bpfsys, bytecode, pins, trust
from pelagos_bpf.bpfabi import ProgType
from pelagos_bpf.cgroup import Cgroup, teardown_cgroup
from pelagos_bpf.devices import layout as devlay
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.net import layout as netlay
from pelagos_bpf.net import program as netprog
from pelagos_bpf.pins import PIN_ENV

pytestmark = pytest.mark.root
# The fresh-process scenarios check file-system trust, not kernel behaviour, and cost ~20-40 s
# each under TCG: the QEMU guests run the tag and pin tests only.
host_only = pytest.mark.skipif(
    bool(os.environ.get("PELAGOS_VM_KERNEL")), reason="kernel-independent; run on the host"
)
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
KMSG = ("c", 1, 11, "r")  # /dev/kmsg: denied by DEFAULT_DEVICE_RULES
NULL = ("c", 1, 3, "r")  # /dev/null: allowed
ALLOW_ALL = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit

SETUP = """
import json, sys
from pelagos_bpf.cgroup import setup_cgroup
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, program
try:
    cfg = CgroupConfig(device_rules=DEFAULT_DEVICE_RULES, path=sys.argv[1])
    cg = setup_cgroup(cfg, None, root=sys.argv[2])
    print(json.dumps({"path": str(cg.path), "prog": program.own_program().ids["pelagos_dev_rt"]}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "msg": str(e)}))
"""


def _unique(prefix: str) -> Path:
    return Path(f"/tmp/{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _nobody(*argv: str) -> None:
    subprocess.run([*AS_NOBODY, *argv], check=True, capture_output=True)


@pytest.fixture
def setup_in_fresh_process(cg_root: Path) -> Iterator[Callable[..., dict]]:
    """setup(name, **env): DEFAULT_DEVICE_RULES on cg_root/name from a new process; its JSON.
    Cgroups it made are torn down afterwards."""
    made: list[Path] = []

    def setup(name: str, **env: str) -> dict:
        r = subprocess.run(
            [sys.executable, "-c", SETUP, f"{cg_root.name}/{name}", str(cg_root.parent)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        out = json.loads(r.stdout)
        if "path" in out:
            made.append(Path(out["path"]))
        return out

    yield setup
    for p in made:
        teardown_cgroup(Cgroup.open(p, root=cg_root))


@pytest.fixture(scope="module")
def honest_bytecode() -> Iterator[Path]:
    """A private root-owned copy of the package's bytecode dir under /tmp."""
    d = _unique("pelagos-honest")
    shutil.copytree(bytecode.PACKAGED_DIR, d)
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _planted_json() -> str:
    return json.dumps(
        {
            "format": bytecode.FORMAT,
            "source": devlay.SOURCE,
            "func": devlay.FUNCS["runtime"],
            "prog_type": int(ProgType.CGROUP_DEVICE),
            "machine": os.uname().machine,
            "inputs_hash": "0" * 64,
            "insns": ALLOW_ALL.hex(),
            "relocs": [],
        }
    )


def _dev_file() -> str:
    return bytecode.file_name(devlay.SOURCE, devlay.FUNCS["runtime"])


def _refused(out: dict, path: Path, why: str) -> None:
    assert out.get("error") == "BpfError", out
    assert f"{path}: " in out["msg"] and why in out["msg"], out["msg"]


@host_only
def test_planted_bytecode_dir_under_tmp_is_refused(setup_in_fresh_process, cg_root: Path) -> None:
    """nobody pre-creates the dir $PELAGOS_BPF_BYTECODE names and plants allow-all bytecode."""
    d = _unique("pelagos-plant")
    try:
        code = "import os, sys; os.mkdir(sys.argv[1]); open(sys.argv[2], 'w').write(sys.argv[3])"
        _nobody(sys.executable, "-c", code, str(d), str(d / _dev_file()), _planted_json())
        assert d.stat().st_uid == NOBODY
        out = setup_in_fresh_process("ctr", PELAGOS_BPF_BYTECODE=str(d))
        _refused(out, d, "owned by uid 65534")
        assert not (cg_root / "ctr").exists()  # the failed setup left nothing behind
    finally:
        shutil.rmtree(d, ignore_errors=True)


@host_only
def test_world_writable_root_bytecode_dir_is_refused(setup_in_fresh_process, cg_root: Path) -> None:
    """A root-owned bytecode dir made under umask 0 (0777): nobody's planted file is not read."""
    d = _unique("pelagos-0777")
    d.mkdir()
    os.chmod(d, 0o777)
    try:
        code = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
        _nobody(sys.executable, "-c", code, str(d / _dev_file()), _planted_json())
        out = setup_in_fresh_process("ctr", PELAGOS_BPF_BYTECODE=str(d))
        _refused(out, d, "mode 0777")
        assert not (cg_root / "ctr").exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@host_only
def test_planted_file_in_root_bytecode_dir_is_refused(
    setup_in_fresh_process, honest_bytecode: Path, cg_root: Path
) -> None:
    """Even in a good dir, a file someone else owns (however it got there) is refused."""
    d = _unique("pelagos-file")
    shutil.copytree(honest_bytecode, d)
    try:
        (d / _dev_file()).write_text(_planted_json())
        os.chown(d / _dev_file(), NOBODY, NOBODY)
        out = setup_in_fresh_process("ctr", PELAGOS_BPF_BYTECODE=str(d))
        _refused(out, d / _dev_file(), "owned by uid 65534")
        assert not (cg_root / "ctr").exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@host_only
def test_honest_bytecode_enforces_default_rules(
    setup_in_fresh_process, honest_bytecode: Path
) -> None:
    out = setup_in_fresh_process("ctr", PELAGOS_BPF_BYTECODE=str(honest_bytecode))
    assert "path" in out, out
    assert probe(Path(out["path"]), [KMSG, NULL]) == [False, True]


# ---------------------------------------------------------------- tags against the kernel


def test_prog_tag_matches_the_kernels_for_device_and_net() -> None:
    dev = devprog.own_program()
    insns = devprog.compiled().insns
    assert devprog.compiled().relocs  # the map-fd zeroing is exercised
    info = bpfsys.prog_info(dev.progs[devlay.FUNCS["runtime"]])
    assert bytes.fromhex(info.tag) in trust.prog_tags(insns)
    assert trust.is_our_program(info, insns, ProgType.CGROUP_DEVICE)
    assert not trust.is_our_program(info, insns, ProgType.CGROUP_SKB)
    assert not trust.is_our_program(info, insns[:-16] + ALLOW_ALL, ProgType.CGROUP_DEVICE)
    shared = netprog.shared_programs()
    for func in (netlay.EG.func, netlay.IN.func):
        fd = shared.progs[func]
        code = bytecode.get_program(netlay.SOURCE, func, ProgType.CGROUP_SKB)
        assert code.relocs
        assert trust.is_our_program(bpfsys.prog_info(fd), code.insns, ProgType.CGROUP_SKB), func


# ---------------------------------------------------------------- pins on a private bpffs


@pytest.fixture
def bpffs() -> Iterator[Path]:
    """A bpffs mounted on a root-owned 0755 dir under /tmp (mode 1777, like any plain mount)."""
    d = _unique("pelagos-bpffs")
    d.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


def _pin_name(monkeypatch: pytest.MonkeyPatch, pin_dir: Path) -> Path:
    monkeypatch.setenv(PIN_ENV, str(pin_dir))
    paths = pins.pin_paths(devprog.FEATURE.current, str(pin_dir))
    return Path(paths[devlay.FUNCS["runtime"]])


def _foreign_program() -> tuple[int, list[int]]:
    """An allow-all device program with our name and our map layout (only the tag differs)."""
    maps = [
        bpfsys.map_create(t, k, v, n, name=name, flags=f)
        for name, (t, k, v), n, f in (
            (m.name, m.layout, m.max_entries, m.flags) for m in devlay.LAYER.maps
        )
    ]
    code = b"".join(
        struct.pack("<BBhi", 0x18, 0x11, 0, fd) + bytes(8) for fd in maps
    )  # r1 = map (x3)
    fd = bpfsys.prog_load(
        ProgType.CGROUP_DEVICE, code + ALLOW_ALL, name=devlay.PROG_NAMES["runtime"]
    )
    return fd, maps


@pytest.fixture
def foreign(bpffs: Path) -> Iterator[Path]:
    """The foreign program, pinned by root at bpffs/foreign."""
    fd, maps = _foreign_program()
    try:
        bpfsys.obj_pin(fd, bpffs / "foreign")
        yield bpffs / "foreign"
    finally:
        for x in (fd, *maps):
            os.close(x)


def test_bpffs_is_sticky_and_world_writable(bpffs: Path) -> None:
    assert bpffs.stat().st_mode & 0o7777 == 0o1777
    os.close(trust.check_pin_dir(bpffs))  # allowed: each pin's owner is checked instead


@host_only
def test_squatting_directory_is_refused(
    bpffs: Path, setup_in_fresh_process, honest_bytecode: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin = _pin_name(monkeypatch, bpffs)
    _nobody("mkdir", str(pin))
    out = setup_in_fresh_process("ctr", PELAGOS_BPF_BYTECODE=str(honest_bytecode))
    _refused(out, pin, "is not a pinned program")


@host_only
def test_squatting_symlink_to_a_foreign_program_is_refused(
    foreign: Path, setup_in_fresh_process, honest_bytecode: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin = _pin_name(monkeypatch, foreign.parent)
    _nobody("ln", "-s", str(foreign), str(pin))
    assert pin.is_symlink()
    out = setup_in_fresh_process("ctr", PELAGOS_BPF_BYTECODE=str(honest_bytecode))
    _refused(out, pin, "is a symlink")


@host_only
def test_foreign_program_under_our_pin_name_is_refused(
    bpffs: Path, setup_in_fresh_process, honest_bytecode: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same name, type and map layout as ours, pinned by root itself: only the tag tells."""
    pin = _pin_name(monkeypatch, bpffs)
    fd, maps = _foreign_program()
    try:
        bpfsys.obj_pin(fd, pin)
    finally:
        for x in (fd, *maps):
            os.close(x)
    out = setup_in_fresh_process("ctr", PELAGOS_BPF_BYTECODE=str(honest_bytecode))
    _refused(out, pin, "not ours")


def test_our_pin_owned_by_someone_else_is_refused(bpffs: Path) -> None:
    insns = devprog.compiled().insns
    pin = bpffs / "ours"
    assert trust.pin_program(devprog.own_program().progs[devlay.FUNCS["runtime"]], pin)
    os.chown(pin, NOBODY, NOBODY)  # in a 1777 dir only root-owned pins are safe from swaps
    with pytest.raises(bpfsys.BpfError, match="owned by uid 65534"):
        trust.open_pinned_program(pin, insns=insns, prog_type=ProgType.CGROUP_DEVICE)


def test_pin_and_open_roundtrip(bpffs: Path) -> None:
    own = devprog.own_program()
    insns = devprog.compiled().insns
    pin = bpffs / "ours"
    assert trust.open_pinned_program(pin, insns=insns, prog_type=ProgType.CGROUP_DEVICE) is None
    assert trust.pin_program(own.progs[devlay.FUNCS["runtime"]], pin)
    assert not trust.pin_program(
        own.progs[devlay.FUNCS["runtime"]], pin
    )  # exists: the caller reads it back instead
    fd = trust.open_pinned_program(pin, insns=insns, prog_type=ProgType.CGROUP_DEVICE)
    assert fd is not None
    try:
        assert bpfsys.prog_info(fd).id == own.ids[devlay.FUNCS["runtime"]]
    finally:
        os.close(fd)
    with pytest.raises(bpfsys.BpfError, match="not ours"):
        trust.open_pinned_program(pin, insns=insns, prog_type=ProgType.CGROUP_SKB)
    map_pin = bpffs / "a_map"
    bpfsys.obj_pin(own.maps["dev_rules"], map_pin)
    with pytest.raises(bpfsys.BpfError, match="not a BPF program"):
        trust.open_pinned_program(map_pin, insns=insns, prog_type=ProgType.CGROUP_DEVICE)


def test_honest_pin_is_shared_and_enforced(
    bpffs: Path, setup_in_fresh_process, honest_bytecode: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin = _pin_name(monkeypatch, bpffs)
    first = setup_in_fresh_process("a", PELAGOS_BPF_BYTECODE=str(honest_bytecode))
    assert "path" in first, first
    assert pin.stat().st_uid == 0
    second = setup_in_fresh_process("b", PELAGOS_BPF_BYTECODE=str(honest_bytecode))
    assert "path" in second, second
    assert second["prog"] == first["prog"]  # fetched from the pin, not loaded again
    for out in (first, second):
        assert probe(Path(out["path"]), [KMSG, NULL]) == [False, True]
