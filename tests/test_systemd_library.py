"""setup_cgroup / update_cgroup / teardown_cgroup, gc, the CLI and the OCI hook under the systemd
driver, against a real systemd 252 as PID 1 (the `--init systemd` guest).

Run there by tests/test_systemd_matrix.py; skipped anywhere systemd is not PID 1. Every unit is
`pelagos-<name>-<token>.scope` in system.slice, every pin lives in /sys/fs/bpf/pelagos-lib-<token>
and every netns carries the lab's unique prefix; fixtures stop the units, remove the pins and
the netns even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import wait_for
from net_helpers import C10, C20, C30, send, topology
from systemd_helpers import DEADLINE, not_under_systemd

from pelagos_bpf import bpfsys, gc
from pelagos_bpf.cgroup import Cgroup, setup_cgroup, teardown_cgroup, update_cgroup
from pelagos_bpf.config import CgroupConfig, CgroupDeviceRule
from pelagos_bpf.errors import ConfigError, UnsupportedSettings
from pelagos_bpf.pins import PIN_ENV
from pelagos_bpf.systemd import driver
from pelagos_bpf.systemd.dbus import SCOPE_IFACE, Manager, Property, SystemdError

pytestmark = pytest.mark.systemd

TOKEN = uuid.uuid4().hex[:8]
HOOK_BIN = Path(sys.executable).parent / "pelagos-bpf"
ALLOW_ALL_BUT = "allow a *:* rwm"


if (_reason := not_under_systemd()) is not None:
    pytest.skip(_reason, allow_module_level=True)


def path_for(name: str) -> str:
    return f"system.slice:pelagos:{name}-{TOKEN}"


def unit_for(name: str) -> str:
    return f"pelagos-{name}-{TOKEN}.scope"


@pytest.fixture(scope="module")
def m() -> Iterator[Manager]:
    with Manager.connect() as mgr:
        yield mgr


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "10000"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def units(m: Manager) -> Iterator[list[str]]:
    """Units a test may start; each is stopped and reset afterwards."""
    names: list[str] = []
    yield names
    for u in names:
        with contextlib.suppress(SystemdError):
            driver.stop_scope(u, manager=m)


def _forget_programs() -> None:
    from pelagos_bpf.devices import program as devprog
    from pelagos_bpf.net import program as netprog

    devprog.FEATURE.forget_loaded()
    netprog.FEATURE.forget_loaded()


@pytest.fixture
def pin_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Pins on, in a directory of this test's own: the node's pin set as the driver uses it.
    Afterwards every pin goes and the programs are dropped from this process."""
    d = Path(f"/sys/fs/bpf/pelagos-lib-{TOKEN}")
    d.mkdir(mode=0o700)
    monkeypatch.setenv(PIN_ENV, str(d))
    _forget_programs()
    try:
        yield d
    finally:
        _forget_programs()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


@pytest.fixture
def no_pins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(PIN_ENV, "")
    _forget_programs()
    yield
    _forget_programs()


def opens(cgroup: Path, *paths: str) -> tuple[int, ...]:
    """errno of open(path, O_RDONLY) by a process inside the cgroup (0 = allowed), for each
    path: one shell moves itself in and tries each (no interpreter start per probe)."""
    script = (
        'echo $$ > "$1"/cgroup.procs || exit 3; shift; for p; do '
        'if err=$( (exec 3<"$p") 2>&1 ); then echo ok; else echo "$err"; fi; done'
    )
    r = subprocess.run(
        ["sh", "-c", script, "sh", str(cgroup), *paths],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert r.returncode == 0, r.stderr
    out = []
    for line in r.stdout.splitlines():
        if line != "ok" and "Operation not permitted" not in line:
            raise AssertionError(f"unexpected open failure: {line}")
        out.append(0 if line == "ok" else errno.EPERM)
    assert len(out) == len(paths), r.stdout
    return tuple(out)


def attached(cgroup: Path, attach_type: int) -> list[int]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bpfsys.prog_query(fd, attach_type)
    finally:
        os.close(fd)


def reload(m: Manager) -> None:
    m.reload(deadline=DEADLINE * 2)


def set_property(unit: str, assignment: str) -> None:
    cmd = ["systemctl", "set-property", "--runtime", unit, assignment]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert r.returncode == 0, r.stderr


def read(cg: Path, name: str) -> str:
    return (cg / name).read_text().strip()


def rules(*text: str) -> list[CgroupDeviceRule]:
    return [CgroupDeviceRule.parse(t) for t in text]


def entries_of(cgroup_id: int) -> dict[str, int]:
    """Map entries of this process's device and net maps keyed by the cgroup."""
    from pelagos_bpf.devices import encode as enc
    from pelagos_bpf.devices import program as devprog
    from pelagos_bpf.net import layout as netlay
    from pelagos_bpf.net import program as netprog

    dev = devprog.FEATURE.loaded().maps
    n_rules = sum(
        1
        for k in bpfsys.map_keys(dev["dev_rules"], enc.RULE_KEY.size)
        if enc.key_head(k)[0] == cgroup_id
    )
    prios = netprog.FEATURE.loaded().maps["net_prios"]
    n_prios = sum(
        1
        for k in bpfsys.map_keys(prios, netlay.PRIO_KEY.size)
        if netlay.PRIO_KEY.unpack(k)[0] == cgroup_id
    )
    return {"dev_rules": n_rules, "net_prios": n_prios}


def freed(prog_id: int) -> bool:
    try:
        os.close(bpfsys.prog_get_fd_by_id(prog_id))
    except OSError as e:
        return e.errno == errno.ENOENT
    return False


# ---------------------------------------------------------------- the library


def test_scope_with_limits_devices_and_classid_survives_reload(
    m: Manager, units: list[str], sleeper: subprocess.Popen[bytes], pin_dir: Path
) -> None:
    from pelagos_bpf.bpfabi import AttachType

    units.append(unit_for("t1"))
    with topology(("va",)) as topo:
        cfg = CgroupConfig(
            path=path_for("t1"),
            memory_limit=64 << 20,
            pids_limit=77,
            cpu_quota=(50_000, 100_000),
            cpu_burst=5_000,
            hugepage_limits=[("2MB", 4 << 20)],
            device_rules=rules(ALLOW_ALL_BUT, "deny c 1:5 rwm"),  # /dev/zero denied
            net_classid=C10,
        )
        cg = setup_cgroup(cfg, sleeper.pid)
        assert cg.unit == unit_for("t1") and cg.scope is not None
        assert cg.path == Path(f"/sys/fs/cgroup/system.slice/{cg.unit}")
        assert read(cg.path, "cgroup.procs") == str(sleeper.pid)
        via = {r.setting: (r.via, r.reload_safe) for r in cg.report.routes}
        assert via == {
            "memory_limit": ("systemd", True),
            "pids_limit": ("systemd", True),
            "cpu_quota": ("systemd", True),
            "cpu_burst": ("file", True),
            "hugepage_limits[0]": ("file", True),
            "device_rules": ("systemd", True),
            "net_classid": ("systemd", True),
        }
        assert set(cg.report.applied) == set(via)
        held = m.unit_property(cg.unit, "BPFProgram", SCOPE_IFACE)
        assert sorted(k for k, _ in held) == ["device", "egress", "ingress"]
        assert all(Path(p).parent == pin_dir for _, p in held)
        progs = {
            t: attached(cg.path, t)
            for t in (AttachType.CGROUP_DEVICE, AttachType.CGROUP_INET_EGRESS)
        }
        assert all(len(ids) == 1 for ids in progs.values()), progs  # systemd's only, once

        def unit(prop: str) -> object:
            return m.unit_property(cg.unit or "", prop, SCOPE_IFACE)

        def files() -> dict[str, str]:
            names = ("memory.max", "pids.max", "cpu.max", "cpu.max.burst", "hugetlb.2MB.max")
            return {n: read(cg.path, n) for n in names}

        expected = {
            "memory.max": str(64 << 20),
            "pids.max": "77",
            "cpu.max": "50000 100000",
            "cpu.max.burst": "5000",
            "hugetlb.2MB.max": str(4 << 20),
        }

        def holds(memory_max: int) -> None:
            assert (unit("MemoryMax"), unit("TasksMax")) == (memory_max, 77)
            assert unit("CPUQuotaPerSecUSec") == 500_000
            assert files() == {**expected, "memory.max": str(memory_max)}
            assert opens(cg.path, "/dev/null", "/dev/zero") == (0, errno.EPERM)
            assert send(topo, "va", 5, cg) == {C10: 5}
            assert {t: attached(cg.path, t) for t in progs} == progs

        holds(64 << 20)
        reload(m)
        holds(64 << 20)
        set_property(cg.unit, "MemoryMax=100M")
        holds(100 << 20)

        # update: a property through SetUnitProperties, rules and classid as map writes
        new = CgroupConfig(
            memory_limit=80 << 20, device_rules=rules(ALLOW_ALL_BUT, "deny c 1:3 rwm")
        )
        report = update_cgroup(cg, new)
        assert {r.setting: r.via for r in report.routes} == {
            "memory_limit": "systemd",
            "device_rules": "systemd",
        }
        # another process opens the scope by its runc path, as a runtime's `update` would
        other = Cgroup.open(path_for("t1"))
        assert other.scope is not None and (other.path, other.id) == (cg.path, cg.id)
        assert sorted(other.scope.bpf_programs) == sorted(held)
        update_cgroup(other, CgroupConfig(net_classid=C30))
        assert read(cg.path, "memory.max") == str(80 << 20)
        assert opens(cg.path, "/dev/null", "/dev/zero") == (errno.EPERM, 0)
        assert send(topo, "va", 4, cg) == {C30: 4}
        assert {t: attached(cg.path, t) for t in progs} == progs
        reload(m)
        assert (opens(cg.path, "/dev/null"), send(topo, "va", 3, cg)) == ((errno.EPERM,), {C30: 3})

        # a carrier needing other programs than systemd holds is refused, nothing changes
        with pytest.raises(ConfigError) as e:
            update_cgroup(cg, CgroupConfig(net_classid=C20, net_carrier="socket"))
        assert e.value.setting == "net_carrier"
        assert send(topo, "va", 2, cg) == {C30: 2}

        # teardown: no unit, no cgroup, no map entry, and nothing keeps the programs
        ids = [i for v in progs.values() for i in v]
        cg_id = cg.id
        teardown_cgroup(cg)
        assert m.unit_path(unit_for("t1")) is None and not cg.path.exists()
        assert entries_of(cg_id) == {"dev_rules": 0, "net_prios": 0}
    _forget_programs()
    for p in pin_dir.iterdir():
        p.unlink()
    for i in ids:
        wait_for(lambda i=i: freed(i), f"program {i} to be freed")  # type: ignore[misc]


def test_socket_carrier_programs_held_by_systemd(
    m: Manager, units: list[str], sleeper: subprocess.Popen[bytes], pin_dir: Path
) -> None:
    """Carrier "socket": systemd holds sock_create + setsockopt instead of egress + ingress."""
    units.append(unit_for("t7"))
    with topology(("va",)) as topo:
        cfg = CgroupConfig(path=path_for("t7"), net_classid=C10, net_carrier="socket")
        cg = setup_cgroup(cfg, sleeper.pid)
        try:
            held = m.unit_property(cg.unit or "", "BPFProgram", SCOPE_IFACE)
            assert sorted(k for k, _ in held) == ["setsockopt", "sock_create"]
            for _ in range(2):
                assert send(topo, "va", 3, cg) == {C10: 3}
                reload(m)
        finally:
            teardown_cgroup(cg)
        assert m.unit_path(unit_for("t7")) is None


def test_without_pins_programs_attach_inside_the_scope_and_survive_reload(
    m: Manager, units: list[str], sleeper: subprocess.Popen[bytes], no_pins: None
) -> None:
    """Pins off (or systemd < 249): systemd cannot hold our programs, so they are attached in
    the delegated scope; systemd leaves attachments it did not make alone across reloads."""
    units.append(unit_for("t2"))
    with topology(("va",)) as topo:
        cfg = CgroupConfig(
            path=path_for("t2"),
            device_rules=rules(ALLOW_ALL_BUT, "deny c 1:5 rwm"),
            net_classid=C10,
        )
        cg = setup_cgroup(cfg, sleeper.pid)
        try:
            via = {r.setting: r.via for r in cg.report.routes}
            assert via == {"device_rules": "scope", "net_classid": "scope"}
            assert "pins are off" in cg.report.routes[0].what
            assert m.unit_property(cg.unit or "", "BPFProgram", SCOPE_IFACE) == []
            for _ in range(2):
                assert opens(cg.path, "/dev/zero") == (errno.EPERM,)
                assert send(topo, "va", 3, cg) == {C10: 3}
                reload(m)
        finally:
            teardown_cgroup(cg)
        assert m.unit_path(unit_for("t2")) is None and not cg.path.exists()


def test_bad_input_and_refusals_leave_nothing(
    m: Manager,
    units: list[str],
    sleeper: subprocess.Popen[bytes],
    pin_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = set(os.listdir("/sys/fs/cgroup/system.slice"))
    origin = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
    units.append(unit_for("t3"))
    good = dict(device_rules=rules(ALLOW_ALL_BUT, "deny c 1:5 rwm"), memory_limit=64 << 20)
    # refused before the bus: a malformed slice, unit names systemd would reject, no pid
    for path in ("a--b.slice:pelagos:x", "system.slice:pelagos:t 3", "system.slice:pelagos:@"):
        with pytest.raises(ConfigError) as e:
            setup_cgroup(CgroupConfig(path=path, **good), sleeper.pid)  # type: ignore[arg-type]
        assert e.value.setting == "path"
    with pytest.raises(ConfigError) as e:
        setup_cgroup(CgroupConfig(path=path_for("t3")), None)
    assert e.value.setting == "pid" and "Scope has no PIDs" in e.value.reason
    # strict: a file systemd rewrites at every daemon-reload is refused, with why
    with pytest.raises(UnsupportedSettings) as ue:
        setup_cgroup(CgroupConfig(path=path_for("t3"), cpu_quota=(33_333, 100_000)), sleeper.pid)
    assert ue.value.problems[0][0] == "cpu_quota" and "daemon-reload" in ue.value.problems[0][1]

    # systemd refuses a property: its error names the unit and the property; nothing stays
    from pelagos_bpf.systemd import properties

    real_plan = properties.plan

    def bad_plan(cfg: CgroupConfig, version: int) -> properties.Plan:
        p = real_plan(cfg, version)
        p.properties.append(Property("CPUQuotaPerSecUSec", "t", 0))
        return p

    monkeypatch.setattr("pelagos_bpf.systemd.lifecycle.plan", bad_plan)
    with pytest.raises(SystemdError) as se:
        setup_cgroup(CgroupConfig(path=path_for("t3"), **good), sleeper.pid)  # type: ignore[arg-type]
    assert unit_for("t3") in str(se.value) and "CPUQuotaPerSecUSec" in str(se.value)
    monkeypatch.setattr("pelagos_bpf.systemd.lifecycle.plan", real_plan)

    # a failure after the start, once the rule set is in the maps (the net settings cannot
    # be written): the scope is stopped and the rule set's entries are gone
    from pelagos_bpf import net

    seen: list[tuple[int, int]] = []  # (cgroup id, its rule entries when net failed)

    def broken(cg: Cgroup, *_a: object, **_k: object) -> None:
        seen.append((cg.id, entries_of(cg.id)["dev_rules"]))
        raise OSError(errno.EIO, "injected")

    real_attach = net.attach_net
    monkeypatch.setattr(net, "attach_net", broken)
    with pytest.raises(OSError, match="injected"):
        setup_cgroup(CgroupConfig(path=path_for("t3"), net_classid=C10, **good), sleeper.pid)  # type: ignore[arg-type]
    monkeypatch.setattr(net, "attach_net", real_attach)
    ((cg_id, written),) = seen
    assert written > 0 and entries_of(cg_id) == {"dev_rules": 0, "net_prios": 0}
    assert m.unit_path(unit_for("t3")) is None
    assert set(os.listdir("/sys/fs/cgroup/system.slice")) == before
    # the caller's process is alive, back in the cgroup it came from
    assert sleeper.poll() is None
    assert Path(f"/proc/{sleeper.pid}/cgroup").read_text() == origin

    # the same name twice: systemd refuses the second start; the first scope is untouched
    cg = setup_cgroup(CgroupConfig(path=path_for("t3"), memory_limit=64 << 20), sleeper.pid)
    try:
        with subprocess.Popen(["sleep", "10000"]) as other:
            try:
                with pytest.raises(SystemdError, match="UnitExists"):
                    setup_cgroup(CgroupConfig(path=path_for("t3")), other.pid)
            finally:
                other.kill()
        assert read(cg.path, "memory.max") == str(64 << 20)
    finally:
        teardown_cgroup(cg)


# ---------------------------------------------------------------- gc


def test_gc_keeps_a_pin_a_unit_references(
    m: Manager, units: list[str], sleeper: subprocess.Popen[bytes], pin_dir: Path
) -> None:
    """The upgrade case: a scope started by an older release references that release's pin (an
    other name than this release's); gc runs, then daemon-reload: the program must still be
    attached and deny (had gc unpinned it, systemd would detach it: the scope fails open)."""
    from pelagos_bpf import loader
    from pelagos_bpf.devices import layout as lay
    from pelagos_bpf.devices import program as devprog

    old = loader.load_layer(devprog.FEATURE.current)  # the older release's load of its set
    try:
        func = lay.FUNCS["runtime"]
        old_pin = pin_dir / f"{lay.PROG_NAMES['runtime']}_0123456789abcdef"
        unused = pin_dir / f"{lay.PROG_NAMES['hook']}_0123456789abcdef"
        bpfsys.obj_pin(old.progs[func], old_pin)
        bpfsys.obj_pin(old.progs[lay.FUNCS["hook"]], unused)
        spec = driver.ScopeSpec.from_path(path_for("t4"))
        units.append(spec.unit)
        scope = driver.start_scope(spec, sleeper.pid, [], [("device", str(old_pin))], manager=m)
        devprog.apply(scope, rules(ALLOW_ALL_BUT, "deny c 1:5 rwm"))
        assert opens(scope.path, "/dev/zero") == (errno.EPERM,)
    finally:
        old.close()  # from here the pins and systemd's attachment hold it

    report = gc.collect()
    assert report.pins_kept == {str(old_pin): [spec.unit]}
    assert str(unused) in report.pins_removed and old_pin.exists()
    reload(m)
    assert attached(scope.path, lay.ATTACH) == [scope_prog_id(old_pin)]
    assert opens(scope.path, "/dev/zero") == (errno.EPERM,)

    # without D-Bus gc removes no pin at all, and says why
    fd = bpfsys.obj_get(str(old_pin))
    try:
        bpfsys.obj_pin(fd, unused)
    finally:
        os.close(fd)
    from pelagos_bpf.systemd import dbus

    def unreachable(*_a: object, **_k: object) -> Manager:
        raise dbus.SystemdUnavailable("injected: no bus")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dbus.Manager, "connect", unreachable)
        report = gc.collect()
    assert report.pins_removed == [] and unused.exists()
    assert any("no pin removed" in n and "injected" in n for n in report.notes), report.notes
    driver.stop_scope(scope, manager=m)
    assert gc.collect().pins_removed == sorted([str(old_pin), str(unused)])


def scope_prog_id(pin: Path) -> int:
    fd = bpfsys.obj_get(str(pin))
    try:
        return bpfsys.prog_info(fd).id
    finally:
        os.close(fd)


def test_gc_resets_our_failed_scopes_only(m: Manager, units: list[str]) -> None:
    """A scope that failed (here: RuntimeMaxSec= ran out) stays loaded as failed; gc resets
    ours (driver.MARK in the Description) and leaves another's failed scope alone."""
    ours = driver.ScopeSpec.from_path(path_for("t5"))
    theirs = driver.ScopeSpec("system.slice", unit_for("t5-foreign"), "somebody else's scope")
    units += [ours.unit, theirs.unit]
    procs = [subprocess.Popen(["sleep", "10000"]) for _ in range(2)]
    try:
        for spec, p in zip((ours, theirs), procs, strict=True):
            driver.start_scope(spec, p.pid, [Property("RuntimeMaxUSec", "t", 100_000)], manager=m)
        for spec in (ours, theirs):
            wait_for(
                lambda u=spec.unit: m.unit_property(u, "ActiveState") == "failed",  # type: ignore[misc]
                f"{spec.unit} to fail",
            )
        report = gc.collect()
        assert ours.unit in report.units_reset and theirs.unit not in report.units_reset
        assert m.unit_path(ours.unit) is None
        assert not Path(f"/sys/fs/cgroup/system.slice/{ours.unit}").exists()
        assert m.unit_property(theirs.unit, "ActiveState") == "failed"
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- CLI


def test_cli_run_systemd_and_inspect(m: Manager, pin_dir: Path) -> None:
    env = {**os.environ, PIN_ENV: str(pin_dir)}
    cmd = [
        str(HOOK_BIN), "run", "--systemd", "--memory", "64M", "--device", ALLOW_ALL_BUT,
        "--device", "deny c 1:5 rwm", "--json", "--",
        "sh", "-c", "cat /proc/self/cgroup; head -c1 /dev/zero >/dev/null",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, env=env)
    assert r.returncode == 1, r.stderr  # head: Operation not permitted
    out = r.stdout.splitlines()
    doc = json.loads(out[-1])
    unit = doc["unit"]
    assert unit.startswith("pelagos-run-") and f"0::/system.slice/{unit}" in out[0]
    routes = {x["setting"]: x["via"] for x in doc["routes"]}
    assert routes == {"memory_limit": "systemd", "device_rules": "systemd"}
    assert m.unit_path(unit) is None  # stopped at the end

    # inspect a running scope: the unit and what systemd holds (the text form: test_cli_systemd)
    with subprocess.Popen(["sleep", "10000"]) as p:
        try:
            cfg = CgroupConfig(
                path=path_for("t6"), memory_limit=64 << 20, device_rules=rules(ALLOW_ALL_BUT)
            )
            cg = setup_cgroup(cfg, p.pid)
            try:
                js = subprocess.run(
                    [str(HOOK_BIN), "inspect", "--json", str(cg.path)], capture_output=True,
                    text=True, env=env, timeout=DEADLINE,
                )  # fmt: skip
                assert js.returncode == 0, js.stderr
                sd = json.loads(js.stdout)["systemd"]
                assert (sd["unit"], sd["delegate"], sd["inside"]) == (cg.unit, True, False)
                assert sd["properties"]["MemoryMax"] == str(64 << 20)
                assert sd["files"]["MemoryMax"] == "memory.max"
                progs = [(x["kind"], x["pin_present"], x["attached"]) for x in sd["programs"]]
                assert progs == [("device", True, True)]
            finally:
                teardown_cgroup(cg)
        finally:
            p.kill()


# ---------------------------------------------------------------- runc --systemd-cgroup + hook


def test_runc_systemd_cgroup_with_hook_classid_survives_reload(
    m: Manager, tmp_path: Path, no_pins: None
) -> None:
    """runc creates the scope (its systemd driver); our hook finds the scope through the
    container's /proc/<pid>/cgroup and attaches its own programs inside it (owner "hook"):
    systemd does not hold them, and they hold across daemon-reload."""
    import shutil

    from test_runtimes import PINGS, Container, _config, _rootfs

    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed")
    from pelagos_bpf.ocihook.locate import cgroup_of_pid

    with topology(("va",)) as topo:
        c = Container(
            runc, tmp_path / "state", f"pelagos-rc-{TOKEN}", tmp_path / "bundle",
            tmp_path / "console.log", tmp_path / "hook-state",
        )  # fmt: skip
        c.bundle.mkdir()
        _rootfs(c.bundle / "rootfs")
        ann = {"io.pelagos-bpf.net.classid": "1:10", "io.pelagos-bpf.devices": "deny c 1:5 r"}
        _config(c, topo, path_for("rc"), ann, {})
        before = topo.counters("va")
        try:
            with open(c.log, "w") as out:
                r = subprocess.run(
                    [runc, "--root", str(c.state_root), "--systemd-cgroup", "run", "-d",
                     "--bundle", str(c.bundle), c.id],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=300,
                )  # fmt: skip
            assert r.returncode == 0, c.log.read_text()
            lines = c.wait_output()
            assert "ping 0" in lines, lines
            zero = [ln for ln in lines if ln.startswith("dev zero ")]
            assert zero and "Operation not permitted" in zero[0], lines  # the hook's rule
            cg_path = cgroup_of_pid(c.pid())
            assert cg_path == Path(f"/sys/fs/cgroup/system.slice/{unit_for('rc')}")
            after = topo.counters("va")
            assert after[C10][1] - before.get(C10, (0, 0))[1] == PINGS

            reload(m)
            peer = topo.peers["va"]
            before = topo.counters("va")
            ping = c.cmd("--systemd-cgroup", "exec", c.id, "ping", "-q", "-c", "3", "-i", "0.2",
                         "-W", "2", peer)  # fmt: skip
            assert ping.returncode == 0
            assert topo.counters("va")[C10][1] - before.get(C10, (0, 0))[1] == 3
            head = c.cmd("--systemd-cgroup", "exec", c.id, "head", "-c1", "/dev/zero", check=False)
            assert "Operation not permitted" in head.stderr
        finally:
            c.cmd("--systemd-cgroup", "delete", "--force", c.id, check=False)
        wait_for(lambda: m.unit_path(unit_for("rc")) is None, "runc's scope to go")
