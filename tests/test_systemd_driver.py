"""The systemd cgroup driver against a real systemd 252 as PID 1 (the `--init systemd` guest).

Run there by tests/test_systemd_matrix.py (`python -m tests.vm.run --kernel 6.12 --init systemd
-- tests/test_systemd_driver.py`); skipped anywhere systemd is not PID 1. Every unit is
`pelagos-<name>-<token>.scope` in system.slice and every pin lives in /sys/fs/bpf/<token>;
fixtures stop the units and remove the pins even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import wait_for
from systemd_helpers import DEADLINE, not_under_systemd

from pelagos_bpf import bpfsys, loader
from pelagos_bpf.config import CgroupConfig, CgroupDeviceRule
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.systemd import driver, properties
from pelagos_bpf.systemd.dbus import SCOPE_IFACE, Manager, Property, SystemdError

pytestmark = pytest.mark.systemd

TOKEN = uuid.uuid4().hex[:8]


if (_reason := not_under_systemd()) is not None:
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="module")
def m() -> Iterator[Manager]:
    with Manager.connect() as mgr:
        yield mgr


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process for a scope; killed and reaped afterwards whatever happened."""
    p = subprocess.Popen(["sleep", "10000"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def scopes(m: Manager) -> Iterator[list[str]]:
    """Units a test starts register here; each is stopped and reset afterwards."""
    units: list[str] = []
    yield units
    for u in units:
        with contextlib.suppress(SystemdError):
            driver.stop_scope(u, manager=m)


def path_for(name: str) -> str:
    return f"system.slice:pelagos:{name}-{TOKEN}"


def unit_gone(m: Manager, unit: str) -> bool:
    return m.unit_path(unit) is None


def read(scope: driver.Scope, name: str) -> str:
    return (scope.path / name).read_text().strip()


def reload_and_wait(m: Manager) -> None:
    m.reload(deadline=DEADLINE * 2)


def set_property(unit: str, assignment: str) -> None:
    """As an operator would: `systemctl set-property --runtime UNIT X=Y`."""
    cmd = ["systemctl", "set-property", "--runtime", unit, assignment]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def loop_device() -> Iterator[tuple[int, int]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from cgtest import loop_device as loop

    with loop() as dev:
        st = os.stat(dev)
        yield os.major(st.st_rdev), os.minor(st.st_rdev)


# ---------------------------------------------------------------- limits


def start(
    m: Manager,
    scopes: list[str],
    name: str,
    pid: int,
    cfg: CgroupConfig,
    bpf: list[tuple[str, str]] | None = None,
) -> tuple[driver.Scope, properties.Plan]:
    """What setup_cgroup will do under the driver: plan, start the scope, write the files."""
    spec = driver.ScopeSpec.from_path(path_for(name))
    plan = properties.plan(cfg, m.version())
    scopes.append(spec.unit)
    scope = driver.start_scope(spec, pid, plan.properties, bpf or [], manager=m)
    driver.write_files(scope, plan.files)
    return scope, plan


def test_scope_limits_read_back_from_systemd_and_files(
    m: Manager, scopes: list[str], sleeper: subprocess.Popen[bytes]
) -> None:
    assert m.version() >= 252
    with loop_device() as (major, minor):
        cfg = CgroupConfig(
            memory_limit=64 << 20,
            memory_reservation=8 << 20,
            memory_high=48 << 20,
            memory_swap=96 << 20,
            memory_oom_group=True,
            cpu_shares=2048,
            cpu_quota=(50_000, 100_000),
            cpu_burst=5_000,
            cpuset_cpus="0",
            cpuset_mems="0",
            pids_limit=77,
            blkio_weight=500,
            blkio_throttle_read_bps=[(major, minor, 1 << 20)],
            blkio_throttle_write_iops=[(major, minor, 100)],
            hugepage_limits=[("2MB", 4 << 20)],
        )
        scope, plan = start(m, scopes, "t1", sleeper.pid, cfg)
        assert plan.unsafe() == []
        assert scope.spec.unit == f"pelagos-t1-{TOKEN}.scope"
        assert scope.path == Path(f"/sys/fs/cgroup/system.slice/pelagos-t1-{TOKEN}.scope")
        assert read(scope, "cgroup.procs") == str(sleeper.pid)

        def unit(prop: str) -> object:
            return m.unit_property(scope.unit, prop, SCOPE_IFACE)

        assert unit("Delegate") is True
        assert (unit("MemoryMax"), unit("MemoryLow"), unit("MemoryHigh")) == (
            64 << 20,
            8 << 20,
            48 << 20,
        )
        assert unit("MemorySwapMax") == 32 << 20
        assert (unit("CPUQuotaPerSecUSec"), unit("CPUQuotaPeriodUSec")) == (500_000, 100_000)
        assert (unit("TasksMax"), unit("OOMPolicy"), unit("IOWeight")) == (77, "kill", 4950)
        assert unit("AllowedCPUs").rstrip(b"\0") == b"\x01"  # systemd pads the mask
        assert unit("IOReadBandwidthMax") == [(f"/dev/block/{major}:{minor}", 1 << 20)]

        def files() -> dict[str, str]:
            names = ["memory.max", "memory.low", "memory.high", "memory.swap.max"]
            names += ["memory.oom.group", "cpu.max", "cpu.max.burst", "pids.max"]
            names += ["cpuset.cpus", "io.weight", "hugetlb.2MB.max"]
            out = {n: read(scope, n) for n in names}
            out["io.max"] = next(
                ln for ln in read(scope, "io.max").splitlines() if ln.startswith(f"{major}:")
            )
            return out

        expected = {
            "memory.max": str(64 << 20),
            "memory.low": str(8 << 20),
            "memory.high": str(48 << 20),
            "memory.swap.max": str(32 << 20),
            "memory.oom.group": "1",
            "cpu.max": "50000 100000",
            "cpu.max.burst": "5000",
            "pids.max": "77",
            "cpuset.cpus": "0",
            "io.weight": "default 4950",
            "hugetlb.2MB.max": str(4 << 20),
            "io.max": f"{major}:{minor} rbps=1048576 wbps=max riops=max wiops=100",
        }
        assert files() == expected

        # systemd re-applies its unit state at daemon-reload and set-property: all still hold
        reload_and_wait(m)
        assert files() == expected
        set_property(scope.unit, "MemoryMax=100M")
        assert files() == {**expected, "memory.max": str(100 << 20)}
        assert unit("MemoryMax") == 100 << 20
        reload_and_wait(m)
        assert files() == {**expected, "memory.max": str(100 << 20)}

        # the library's update path: SetUnitProperties + files
        new = properties.plan(CgroupConfig(memory_limit=80 << 20, pids_limit=50), m.version())
        driver.update_scope(scope, new, manager=m)
        assert (read(scope, "memory.max"), read(scope, "pids.max")) == (str(80 << 20), "50")
        driver.stop_scope(scope, manager=m)
        assert unit_gone(m, scope.unit) and not scope.path.exists()


def test_systemd_rewrites_files_it_manages(
    m: Manager, scopes: list[str], sleeper: subprocess.Popen[bytes]
) -> None:
    """Why the driver carries settings as properties: a value written as a file into a file
    systemd manages is gone after daemon-reload; files systemd leaves alone stay."""
    scope, _ = start(m, scopes, "t2", sleeper.pid, CgroupConfig(memory_limit=64 << 20))
    for name, value in (("memory.high", "50000000"), ("pids.max", "33"), ("io.weight", "300")):
        (scope.path / name).write_text(value)
    (scope.path / "cpu.max.burst").write_text("1000")
    reload_and_wait(m)
    assert read(scope, "memory.high") == "max"
    assert read(scope, "pids.max") != "33"
    assert read(scope, "io.weight") == "default 100"
    assert read(scope, "cpu.max.burst") == "1000"
    assert read(scope, "memory.max") == str(64 << 20)


# ---------------------------------------------------------------- BPF owned by systemd


@pytest.fixture
def device_pin() -> Iterator[tuple[str, int]]:
    """A fresh instance of the device program (its own maps), pinned under a test dir: its
    id vanishing after teardown proves nobody (systemd included) still holds it."""
    from pelagos_bpf.devices import layout as lay
    from pelagos_bpf.devices import program as devprog

    d = Path(f"/sys/fs/bpf/pelagos-test-{TOKEN}")
    pin = d / "dev"
    with contextlib.ExitStack() as cleanup:
        d.mkdir(mode=0o700)
        cleanup.callback(d.rmdir)
        cleanup.callback(lambda: pin.unlink(missing_ok=True))
        loaded = loader.load_layer(devprog.FEATURE.current)  # an instance of its own
        cleanup.callback(loaded.close)
        bpfsys.obj_pin(loaded.progs[lay.FUNCS["runtime"]], pin)
        yield str(pin), loaded.ids[lay.FUNCS["runtime"]]


def opens(scope: driver.Scope, path: str) -> int:
    """errno of open(path) by a process inside the scope (0 = allowed)."""
    code = "import os,sys\ntry: os.open(sys.argv[1], 0)\nexcept OSError as e: print(e.errno)"
    script = 'echo $$ > "$1"/cgroup.procs && exec "$2" -I -S -c "$3" "$4"'
    argv = ["sh", "-c", script, "sh", str(scope.path), sys.executable, code, path]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip() or 0)


def attach_flags(scope: driver.Scope, attach_type: int) -> tuple[int, list[int]]:
    from pelagos_bpf.bpfabi import QueryAttr
    from pelagos_bpf.bpfsys import _bpf, _out_buffer, _u32s

    fd = scope.open_fd()
    try:
        ids, addr = _out_buffer(4 * 16)
        q = QueryAttr(target_fd=fd, attach_type=attach_type, prog_ids=addr, prog_cnt=16)
        assert _bpf("BPF_PROG_QUERY", q) == 0
        return int(q.attach_flags), _u32s(ids, q.prog_cnt)
    finally:
        os.close(fd)


def test_device_program_attached_by_systemd_survives_reload(
    m: Manager,
    scopes: list[str],
    sleeper: subprocess.Popen[bytes],
    device_pin: tuple[str, int],
) -> None:
    from pelagos_bpf.devices import layout as lay
    from pelagos_bpf.devices import program as devprog

    pin, prog_id = device_pin
    scope, _ = start(m, scopes, "t3", sleeper.pid, CgroupConfig(), [("device", pin)])
    assert m.unit_property(scope.unit, "BPFProgram", SCOPE_IFACE) == [("device", pin)]
    other = driver.open_scope(path_for("t3"), manager=m)  # as the hook or the agent would
    assert other is not None
    assert (other.path, other.id, other.bpf_programs) == (scope.path, scope.id, scope.bpf_programs)
    assert attach_flags(scope, lay.ATTACH) == (bpfsys.BPF_F_ALLOW_MULTI, [prog_id])
    # attached, no rule set written yet: the program denies everything (fail closed)
    assert opens(scope, "/dev/null") == errno.EPERM
    # the owner's rule set goes into the program's maps, keyed by the scope's cgroup id
    rules = [CgroupDeviceRule(False), CgroupDeviceRule(True, "c", 1, 3, "rwm")]  # /dev/null
    devprog.apply(scope, rules)
    assert (opens(scope, "/dev/null"), opens(scope, "/dev/zero")) == (0, errno.EPERM)
    # attaching the same program a second time is refused by the kernel: EINVAL (measured on
    # 5.10, 6.1, 6.12; EEXIST before 5.7). The hook and the agent must only write the maps
    fd = bpfsys.obj_get(pin)
    cgfd = scope.open_fd()
    try:
        with pytest.raises(OSError) as e:
            bpfsys.prog_attach(fd, cgfd, lay.ATTACH, bpfsys.BPF_F_ALLOW_MULTI)
        assert e.value.errno in (errno.EEXIST, errno.EINVAL)
    finally:
        os.close(cgfd)
        os.close(fd)

    def reexec() -> None:  # systemctl returns once the re-executed manager serves again
        cmd = ["systemctl", "daemon-reexec"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE * 2, check=False)
        assert r.returncode == 0, r.stderr

    for change in (
        lambda: reload_and_wait(m),
        lambda: set_property(scope.unit, "MemoryMax=90M"),
        reexec,  # the last: `m`'s connection may not outlive it
    ):
        change()
        assert attach_flags(scope, lay.ATTACH) == (bpfsys.BPF_F_ALLOW_MULTI, [prog_id])
        state = devprog.read_state(scope)
        rt = state.owner("runtime")
        assert state.installed and rt is not None and rt.generation == 1  # storage kept
        assert (opens(scope, "/dev/null"), opens(scope, "/dev/zero")) == (0, errno.EPERM)

    # a rule update is a map write; systemd's attachment is untouched
    devprog.apply(scope, [CgroupDeviceRule(False), CgroupDeviceRule(True, "c", 1, 5, "r")])
    assert (opens(scope, "/dev/null"), opens(scope, "/dev/zero")) == (errno.EPERM, 0)
    assert attach_flags(scope, lay.ATTACH) == (bpfsys.BPF_F_ALLOW_MULTI, [prog_id])

    # teardown: the rule set's keys are read first, the scope stopped, then they go (on a new
    # connection: the re-executed manager may have closed the private socket's)
    keys = devprog.removal_keys(scope)
    with Manager.connect() as m2:
        driver.stop_scope(scope, manager=m2)
        assert unit_gone(m2, scope.unit) and not scope.path.exists()
    if keys is not None:
        devprog.remove_entries(keys)


def test_pin_must_outlive_its_unit(
    m: Manager,
    scopes: list[str],
    sleeper: subprocess.Popen[bytes],
    device_pin: tuple[str, int],
) -> None:
    """systemd re-opens BPFProgram= paths at daemon-reload (and daemon-reexec): a pin removed
    under a running unit (an upgrade's gc, say) makes systemd drop the program, leaving the
    scope with no device program at all. So gc must keep every pin a unit references."""
    from pelagos_bpf.devices import layout as lay
    from pelagos_bpf.devices import program as devprog

    pin, prog_id = device_pin
    scope, _ = start(m, scopes, "t8", sleeper.pid, CgroupConfig(), [("device", pin)])
    assert driver.referenced_pins(manager=m)[pin] == [scope.unit]
    devprog.apply(scope, [CgroupDeviceRule(False), CgroupDeviceRule(True, "c", 1, 3, "rwm")])
    assert opens(scope, "/dev/zero") == errno.EPERM
    os.unlink(pin)
    set_property(scope.unit, "MemoryMax=90M")  # set-property does not re-open the pin
    assert attach_flags(scope, lay.ATTACH) == (bpfsys.BPF_F_ALLOW_MULTI, [prog_id])
    reload_and_wait(m)  # daemon-reload does: the program is gone, the scope unrestricted
    assert attach_flags(scope, lay.ATTACH)[1] == []
    assert opens(scope, "/dev/zero") == 0


def test_teardown_leaves_no_program(
    m: Manager, scopes: list[str], sleeper: subprocess.Popen[bytes]
) -> None:
    """After stop and unpin, the program's id is gone: systemd kept no reference."""
    from pelagos_bpf.devices import layout as lay
    from pelagos_bpf.devices import program as devprog

    d = Path(f"/sys/fs/bpf/pelagos-test-{TOKEN}-gone")
    pin = d / "dev"
    with contextlib.ExitStack() as cleanup:
        d.mkdir(mode=0o700)
        cleanup.callback(d.rmdir)
        cleanup.callback(lambda: pin.unlink(missing_ok=True))
        loaded = loader.load_layer(devprog.FEATURE.current)  # an instance of its own
        prog_id = loaded.ids[lay.FUNCS["runtime"]]
        closing = cleanup.enter_context(contextlib.ExitStack())
        closing.callback(loaded.close)
        bpfsys.obj_pin(loaded.progs[lay.FUNCS["runtime"]], pin)
        scope, _ = start(m, scopes, "t4", sleeper.pid, CgroupConfig(), [("device", str(pin))])
        closing.close()  # from here only the pin and systemd hold the program
        driver.stop_scope(scope, manager=m)
        assert unit_gone(m, scope.unit) and not scope.path.exists()
        pin.unlink()

    def freed() -> bool:
        try:
            os.close(bpfsys.prog_get_fd_by_id(prog_id))
        except OSError as e:
            return e.errno == errno.ENOENT
        return False

    wait_for(freed, f"program {prog_id} to be freed")


# ---------------------------------------------------------------- failed scopes, bad input


def test_dead_process_and_failed_scope(m: Manager, scopes: list[str]) -> None:
    spec = driver.ScopeSpec.from_path(path_for("t5"))
    scopes.append(spec.unit)
    # the process died before the start: systemd refuses, nothing is made
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(SystemdError, match="UnixProcessIdUnknown") as e:
        driver.start_scope(spec, p.pid, manager=m)
    assert e.value.unit == spec.unit and unit_gone(m, spec.unit)

    # the process dies just after the start: systemd 252 collects the scope by itself
    p = subprocess.Popen(["sleep", "0.2"])
    scope = driver.start_scope(spec, p.pid, manager=m)
    p.wait()
    wait_for(lambda: unit_gone(m, spec.unit), "the emptied scope to be collected")
    assert not scope.path.exists()

    # a scope that failed (RuntimeMaxSec exceeded) stays loaded as failed: a new start of the
    # same name resets it and retries once, as runc
    p = subprocess.Popen(["sleep", "10000"])
    try:
        driver.start_scope(spec, p.pid, [Property("RuntimeMaxUSec", "t", 200_000)], manager=m)

        def failed() -> bool:
            return m.unit_property(spec.unit, "ActiveState") == "failed"

        wait_for(failed, "the scope to fail")
        assert m.unit_property(spec.unit, "Result", SCOPE_IFACE) == "timeout"
        with subprocess.Popen(["sleep", "10000"]) as q:
            scope = driver.start_scope(spec, q.pid, manager=m)
            assert m.unit_property(spec.unit, "ActiveState") == "active"
            driver.stop_scope(scope, manager=m)
            q.wait()
    finally:
        p.kill()
        p.wait()
    assert unit_gone(m, spec.unit)


def test_bad_input_leaves_nothing(
    m: Manager,
    scopes: list[str],
    sleeper: subprocess.Popen[bytes],
    device_pin: tuple[str, int],
) -> None:
    before = set(os.listdir("/sys/fs/cgroup/system.slice"))
    # refused before any D-Bus call
    for path in ("a--b.slice:pelagos:x", "system.slice:pelagos:t 6", "system.slice:pelagos:@"):
        with pytest.raises(ConfigError) as e:
            driver.ScopeSpec.from_path(path)
        assert e.value.setting == "path"
    # a unit name systemd itself rejects (our check bypassed): its error, named
    with pytest.raises(SystemdError, match="InvalidArgs") as se:
        m.start_transient_unit(f"pelagos bad {TOKEN}.scope", [])
    assert f"pelagos bad {TOKEN}.scope" in str(se.value)
    # properties systemd refuses: unknown, and out of range
    spec = driver.ScopeSpec.from_path(path_for("t6"))
    scopes.append(spec.unit)
    for bad in (Property("NoSuchSetting", "t", 1), Property("CPUWeight", "t", 20_000)):
        with pytest.raises(SystemdError) as se:
            driver.start_scope(spec, sleeper.pid, [bad], manager=m)
        assert spec.unit in str(se.value) and bad.name in str(se.value)
        assert unit_gone(m, spec.unit)
    # a program systemd cannot attach (a device program as egress): systemd only logs that,
    # the driver finds it unattached and stops the scope
    origin = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
    with pytest.raises(SystemdError, match="not attached"):
        driver.start_scope(spec, sleeper.pid, [], [("egress", device_pin[0])], manager=m)
    assert unit_gone(m, spec.unit)
    # the caller's process was given back before the stop (which would have killed it)
    assert sleeper.poll() is None
    assert Path(f"/proc/{sleeper.pid}/cgroup").read_text() == origin
    # a pin that is not there: ConfigError before the bus
    with pytest.raises(ConfigError, match="not a pinned BPF program"):
        driver.start_scope(spec, sleeper.pid, [], [("device", f"/sys/fs/bpf/none-{TOKEN}")])
    assert unit_gone(m, spec.unit)
    assert set(os.listdir("/sys/fs/cgroup/system.slice")) == before


def test_private_socket_without_the_bus(
    monkeypatch: pytest.MonkeyPatch, scopes: list[str], sleeper: subprocess.Popen[bytes]
) -> None:
    """No bus daemon answering: root falls back to systemd's private socket (as go-systemd)."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
    with Manager.connect() as pm:
        assert pm.peer and pm.version() >= 252
        spec = driver.ScopeSpec.from_path(path_for("t7"))
        scopes.append(spec.unit)
        scope = driver.start_scope(spec, sleeper.pid, manager=pm)
        assert read(scope, "cgroup.procs") == str(sleeper.pid)
        driver.stop_scope(scope, manager=pm)
        assert pm.unit_path(spec.unit) is None
