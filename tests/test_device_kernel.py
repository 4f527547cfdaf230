"""Device rules enforced by the real kernel (root): probes from a process inside the cgroup."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from device_helpers import (
    FREE_BLOCK,
    FREE_CHAR,
    PROBE_DEVICES,
    REAL_CHAR,
    bpf_fds,
    grid,
    probe,
    progs_using_map,
    rules_st,
)
from hypothesis import HealthCheck, given, settings

from pelagos_bpf import bpfsys
from pelagos_bpf.bpfsys import AttachType, ProgType
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import (
    DEFAULT_DEVICE_RULES,
    attach_devices,
    detach_devices,
    device_allowed,
    layout,
    program,
    read_device_denials,
    update_devices,
)
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.errors import BpfError

pytestmark = pytest.mark.root

USER_RULES = [R(True, "c", 240, 1, "r"), R(False, "c", 1, 9, "w"), R(True, "b", 240, -1, "rw")]
RULES = [*DEFAULT_DEVICE_RULES, *USER_RULES]
DEVICES = [
    *(("c", m, n) for m in FREE_CHAR[:2] for n in (0, 1)),
    *(("b", m, n) for m in FREE_BLOCK[:2] for n in (0, 1)),
    *(("c", ma, mi) for ma, mi in REAL_CHAR),
]
ALLOW_ALL = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit


def expected(rules: list[R], probes: list[tuple[str, int, int, str]]) -> list[bool]:
    return [device_allowed(rules, k, ma, mi, op) for k, ma, mi, op in probes]


def our_prog_ids(cg: Cgroup) -> list[int]:
    fd = cg.open_fd()
    try:
        return bpfsys.prog_query(fd, AttachType.CGROUP_DEVICE)
    finally:
        os.close(fd)


def rule_entries_of(cgroup_id: int) -> int:
    fd = program.FEATURE.loaded().maps["dev_rules"]
    return sum(
        1 for k in bpfsys.map_keys(fd, enc.RULE_KEY.size) if enc.RULE_KEY.unpack(k)[0] == cgroup_id
    )


def denial_entries_of(cgroup_id: int) -> int:
    fd = program.FEATURE.loaded().maps["dev_denials"]
    return sum(
        1 for k in bpfsys.map_keys(fd, enc.DENY_KEY.size) if enc.DENY_KEY.unpack(k)[0] == cgroup_id
    )


def test_defaults_plus_user_rules_enforced(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("dev")
    attach_devices(cg, RULES)
    probes = grid(DEVICES)
    got = probe(cg.path, probes)
    assert got == expected(RULES, probes)
    by_probe = dict(zip(probes, got, strict=True))
    assert by_probe[("c", 240, 0, "r")] is False  # deny-all default
    assert by_probe[("c", 240, 1, "r")] is True  # user allow
    assert by_probe[("c", 240, 1, "rw")] is False  # O_RDWR needs w too
    assert by_probe[("c", 240, 0, "m")] is True  # c *:* m
    assert by_probe[("c", 1, 3, "rw")] is True  # /dev/null
    assert by_probe[("c", 1, 9, "w")] is False  # user rule overrides the default allow
    assert by_probe[("c", 1, 9, "r")] is True
    assert by_probe[("b", 240, 1, "rw")] is True
    assert by_probe[("b", 241, 1, "r")] is False


def test_no_rules_no_program(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("dev")
    attach_devices(cg, [])
    assert our_prog_ids(cg) == []
    probes = grid(DEVICES[:2])
    assert all(probe(cg.path, probes))


# Under TCG (QEMU matrix guests set PELAGOS_VM_KERNEL) one example costs ~2.5 s: the host runs
# the full 40, each guest a smaller derandomized share so the matrix fits CI's time.
KERNEL_EXAMPLES = 12 if os.environ.get("PELAGOS_VM_KERNEL") else 40


@pytest.mark.parametrize("mode", ["fresh", "update"])
def test_kernel_matches_evaluator(cg_root: Path, mode: str) -> None:
    (cg_root / "shared").mkdir()
    shared = Cgroup.open(cg_root / "shared")
    probes = grid(PROBE_DEVICES)

    @settings(
        max_examples=KERNEL_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(rules=rules_st)
    def check(rules: list[R]) -> None:
        if mode == "update":
            update_devices(shared, rules)
            assert len(our_prog_ids(shared)) == 1
            assert probe(shared.path, probes) == expected(rules, probes)
            return
        p = cg_root / f"f{uuid.uuid4().hex[:8]}"
        p.mkdir()
        cg = Cgroup.open(p)
        try:
            attach_devices(cg, rules)
            assert probe(cg.path, probes) == expected(rules, probes)
        finally:
            detach_devices(cg)
            p.rmdir()
        assert rule_entries_of(cg.id) == 0

    check()


def test_live_update_hotplug_and_generations(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("dev")
    attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    prog_ids = our_prog_ids(cg)
    assert len(prog_ids) == 1
    gpu = ("c", 241, 0, "rw")
    assert probe(cg.path, [gpu]) == [False]
    for i in range(100):
        rules = [*DEFAULT_DEVICE_RULES, R(i % 2 == 0, "c", 241, 0, "rw")]
        update_devices(cg, rules)
        if i % 25 in (0, 1):
            assert probe(cg.path, [gpu]) == [i % 2 == 0]
        assert our_prog_ids(cg) == prog_ids  # same program: map writes only
    # two generations at most (the previous one is kept until the next update)
    n_patterns = len(enc.encode_rules(rules))
    assert rule_entries_of(cg.id) <= 2 * 2 * n_patterns
    update_devices(cg, [])  # no rules: no program
    assert our_prog_ids(cg) == []
    assert rule_entries_of(cg.id) == 0


def test_denial_audit(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("dev")
    attach_devices(cg, RULES)
    probes = [("c", 240, 0, "r"), ("c", 240, 0, "r"), ("c", 240, 1, "rw"), ("b", 241, 0, "m")]
    probes += [("c", 1, 3, "rw"), ("c", 1, 9, "w")]
    assert probe(cg.path, probes) == [False, False, False, True, True, False]
    assert read_device_denials(cg) == {"c 240:0 r": 2, "c 240:1 rw": 1, "c 1:9 w": 1}
    assert denial_entries_of(cg.id) == 3
    detach_devices(cg)
    assert read_device_denials(cg) == {}
    assert denial_entries_of(cg.id) == 0
    assert rule_entries_of(cg.id) == 0
    detach_devices(cg)  # idempotent


def _nested_child(cg_path: Path, wfd: int) -> None:
    """Inside the restricted cgroup: make a child cgroup, attach allow-all there, move in, probe."""
    try:
        with open(cg_path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        sub = cg_path / "sub"
        sub.mkdir()
        prog = bpfsys.prog_load(ProgType.CGROUP_DEVICE, ALLOW_ALL, name="allow_all")
        fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        bpfsys.prog_attach(prog, fd, AttachType.CGROUP_DEVICE, bpfsys.BPF_F_ALLOW_MULTI)
        n_eff = len(bpfsys.prog_query(fd, AttachType.CGROUP_DEVICE, effective=True))
        with open(sub / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        res = []
        for path, flags in (("/dev/null", os.O_RDWR), ("/dev/urandom", os.O_WRONLY)):
            try:
                os.close(os.open(path, flags))
                res.append("ok")
            except OSError as e:
                res.append(errno.errorcode[e.errno or 0])
        os.write(wfd, f"{n_eff} {' '.join(res)}".encode())
    except BaseException as e:
        os.write(wfd, f"error {e!r}".encode())
    finally:
        os._exit(0)


def test_nested_child_cannot_loosen(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("dev")
    attach_devices(cg, [*DEFAULT_DEVICE_RULES, R(False, "c", 1, 9, "w")])
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _nested_child(cg.path, wfd)
    os.close(wfd)
    out = os.read(rfd, 4096).decode()
    os.close(rfd)
    os.waitpid(pid, 0)
    # both programs in effect; the child's allow-all cannot lift the parent's deny
    assert out == "2 ok EPERM"


def test_attach_failure_leaves_nothing(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("dev")
    prog = bpfsys.prog_load(ProgType.CGROUP_DEVICE, ALLOW_ALL, name="excl_test")
    fd = cg.open_fd()
    try:
        bpfsys.prog_attach(prog, fd, AttachType.CGROUP_DEVICE, flags=0)  # exclusive: blocks MULTI
        program.FEATURE.loaded()
        with pytest.raises(BpfError) as ei:
            attach_devices(cg, RULES)
        assert ei.value.errno == errno.EPERM
        assert "ALLOW_MULTI" in str(ei.value)
        assert len(bpfsys.prog_query(fd, AttachType.CGROUP_DEVICE)) == 1  # only the exclusive one
        assert rule_entries_of(cg.id) == 0
        bpfsys.prog_detach(prog, fd, AttachType.CGROUP_DEVICE)
    finally:
        os.close(fd)
        os.close(prog)


def _run_py(code: str) -> str:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout


def test_other_process_updates_audits_and_detaches(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("dev")
    attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    assert probe(cg.path, [("c", 240, 0, "r")]) == [False]
    head = (
        "from pelagos_bpf.cgroup import Cgroup; from pelagos_bpf import devices as d;"
        "from pelagos_bpf.config import CgroupDeviceRule as R;"
        f"cg = Cgroup.open({str(cg.path)!r});"
    )
    out = _run_py(
        head + "print(d.read_device_denials(cg));"
        "d.update_devices(cg, [*d.DEFAULT_DEVICE_RULES, R(True, 'c', 240, 0, 'r')])"
    )
    assert out.strip() == "{'c 240:0 r': 1}"
    assert len(our_prog_ids(cg)) == 1  # updated in place, not a second program
    assert probe(cg.path, [("c", 240, 0, "r"), ("c", 240, 1, "r")]) == [True, False]
    _run_py(head + "d.detach_devices(cg); d.detach_devices(cg)")
    assert our_prog_ids(cg) == []
    assert rule_entries_of(cg.id) == 0
    assert denial_entries_of(cg.id) == 0


def test_no_leak_over_setup_teardown_and_updates(cg_root: Path) -> None:
    """200 setup/teardown + 100 update cycles: programs, maps, fds and entries at baseline.

    The one shared program (and its 3 maps) is loaded before the baseline: that is the design.
    Other suites may load programs meanwhile, so kernel-wide counts are taken over what our
    design can leak: programs using our maps (only the shared one), BPF fds this process holds
    (foreign handles must be closed), attachments (checked per cgroup) and map entries.
    """
    prog = program.FEATURE.loaded()
    rules_map_id = bpfsys.map_info(prog.maps["dev_rules"]).id
    base_progs = progs_using_map(rules_map_id)
    base_fds = bpf_fds()
    base_entries = len(bpfsys.map_keys(prog.maps["dev_rules"], enc.RULE_KEY.size))
    assert base_progs == sorted(prog.ids.values())  # one program per owner, sharing the maps
    for i in range(200):
        p = cg_root / f"leak{i}"
        p.mkdir()
        cg = Cgroup.open(p)
        attach_devices(cg, [*RULES, R(True, "c", 242, i, "r")])
        assert our_prog_ids(cg) == [prog.ids[layout.FUNCS["runtime"]]]
        detach_devices(cg)
        assert our_prog_ids(cg) == []
        p.rmdir()
    p = cg_root / "upd"
    p.mkdir()
    cg = Cgroup.open(p)
    attach_devices(cg, RULES)
    for i in range(100):
        update_devices(cg, [*RULES, R(True, "c", 242, i, "r")])
    assert our_prog_ids(cg) == [prog.ids[layout.FUNCS["runtime"]]]
    detach_devices(cg)
    p.rmdir()
    assert progs_using_map(rules_map_id) == base_progs
    assert bpf_fds() == base_fds
    assert len(bpfsys.map_keys(prog.maps["dev_rules"], enc.RULE_KEY.size)) == base_entries


def test_pinned_program_shared_across_processes(cg_root: Path, tmp_path: Path) -> None:
    """With $PELAGOS_BPF_PIN_DIR, a second process reuses the first one's program (no load)."""
    pin_dir = tmp_path / f"bpffs-{uuid.uuid4().hex[:8]}"
    pin_dir.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pin_dir)], check=True)
    try:
        env = dict(os.environ, PELAGOS_BPF_PIN_DIR=str(pin_dir))
        ids = []
        for name in ("a", "b"):
            (cg_root / name).mkdir()
            code = (
                "from pelagos_bpf.cgroup import Cgroup; from pelagos_bpf import devices as d;"
                f"d.attach_devices(Cgroup.open({str(cg_root / name)!r}), d.DEFAULT_DEVICE_RULES)"
            )
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            cg = Cgroup.open(cg_root / name)
            ids += our_prog_ids(cg)
            assert probe(cg.path, [("c", 240, 0, "r"), ("c", 1, 3, "rw")]) == [False, True]
        assert len(ids) == 2 and ids[0] == ids[1]
        # (a fresh bpffs may also hold the kernel's maps.debug / progs.debug)
        pins = [p for p in pin_dir.iterdir() if p.name.startswith(layout.PROG_NAMES["runtime"])]
        assert len(pins) == 1
        for name in ("a", "b"):
            detach_devices(Cgroup.open(cg_root / name))
        for p in pins:
            p.unlink()
    finally:
        subprocess.run(["umount", str(pin_dir)], check=True)
