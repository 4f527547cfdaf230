"""The feature runtime: finding our programs on a cgroup by name and version, layouts checked."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

import pytest

from pelagos_bpf import bpfsys, pins, trust
from pelagos_bpf.bpfabi import AttachType, MapType, ProgType
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import layout
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.errors import BpfError
from pelagos_bpf.feature import Feature
from pelagos_bpf.pins import PIN_ENV


def _prog_using(map_fd: int, name: str) -> int:
    """A device program named `name` that references map_fd and allows everything."""
    insns = b"".join(
        [
            struct.pack("<BBhi", 0x18, 0x11, 0, map_fd),  # r1 = map (BPF_PSEUDO_MAP_FD)
            struct.pack("<BBhi", 0, 0, 0, 0),
            struct.pack("<BBhi", 0xB7, 0x00, 0, 1),  # r0 = 1
            struct.pack("<BBhi", 0x95, 0, 0, 0),  # exit
        ]
    )
    return bpfsys.prog_load(ProgType.CGROUP_DEVICE, insns, name=name)


def test_open_attached_matches_name_and_refuses_another_layout(
    make_cgroup: Callable[[str], Cgroup],
) -> None:
    cg = make_cgroup("pf")
    # A map named like ours but with another key size: what an older version could leave.
    spec = layout.LAYER.map("dev_rules")
    bad = bpfsys.map_create(MapType.HASH, 4, spec.value_size, 8, "dev_rules")
    fds = [bad, _prog_using(bad, layout.PROG_NAMES["runtime"]), _prog_using(bad, "someone_else")]
    cgfd = cg.open_fd()
    try:
        for fd in fds[1:]:
            bpfsys.prog_attach(fd, cgfd, AttachType.CGROUP_DEVICE)
        info = bpfsys.prog_info(fds[1])
        assert devprog.FEATURE.recognise(info) is not None  # our name and type...
        assert devprog.FEATURE.recognise(bpfsys.prog_info(fds[2])) is None
        # ...but not our layout: refused, not misread
        with pytest.raises(BpfError) as e, devprog.FEATURE.find(cgfd):
            pass
        assert e.value.errno == errno.EPROTO and "does not have the layout" in str(e.value)
        with pytest.raises(BpfError, match="does not have the layout"):
            devprog.denials(cg)
    finally:
        for fd in fds[1:]:
            bpfsys.prog_detach(fd, cgfd, AttachType.CGROUP_DEVICE)
        for fd in (cgfd, *fds):
            os.close(fd)


def test_program_names_carry_the_layout_version() -> None:
    """Kernel names fit BPF_OBJ_NAME_LEN and tell every known version apart."""
    from pelagos_bpf.registry import FEATURES

    seen: set[tuple[str, int]] = set()
    for feat in FEATURES:
        for lay in feat.layers:
            for p in lay.progs:
                assert len(p.name) <= 15, p.name
                assert (p.name, int(p.prog_type)) not in seen
                seen.add((p.name, int(p.prog_type)))
                if lay.version > 1:
                    assert p.name.endswith(f"_v{lay.version}")


@pytest.mark.root  # mounts a bpffs
def test_a_squatted_pin_with_another_program_is_refused(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin under our expected name holding another program (same name, type) is refused by
    its tag, with an error naming the path."""
    import subprocess
    import uuid

    d = tmp_path / f"bpffs-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        monkeypatch.setenv(PIN_ENV, str(d))
        feat = Feature(layout.LAYER)
        path = pins.pin_paths(feat.current, str(d))[layout.FUNCS["runtime"]]
        m = bpfsys.map_create(MapType.HASH, 4, 4, 8, "x")
        squat = _prog_using(m, layout.PROG_NAMES["runtime"])
        bpfsys.obj_pin(squat, path)
        os.close(squat)
        os.close(m)
        with pytest.raises(BpfError) as e:
            feat.loaded()
        assert path in str(e.value) and "tag" in str(e.value)
        os.unlink(path)
        assert feat.loaded().progs  # the real program loads and pins once the squat is gone
        dirfd = trust.check_pin_dir(d)
        try:
            again = pins.from_pins(feat.current, dirfd, pins.pin_paths(feat.current, str(d)))
        finally:
            os.close(dirfd)
        assert again is not None
        assert again.ids == feat.loaded().ids  # a second user shares the pinned program
        again.close()
        feat.loaded().close()
    finally:
        subprocess.run(["umount", str(d)], check=True)


# ---------------------------------------------------------------- pin sets (several programs)


@pytest.fixture
def pin_fs(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A private bpffs as $PELAGOS_BPF_PIN_DIR, unmounted afterwards."""
    import subprocess
    import uuid

    d = tmp_path / f"bpffs-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    monkeypatch.setenv(PIN_ENV, str(d))
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def _own_load(monkeypatch: pytest.MonkeyPatch, layer):
    """A private load of `layer` (pins off), as another process would have made it."""

    with monkeypatch.context() as m:
        m.setenv(PIN_ENV, "")
        return Feature(layer).loaded()


def _net_layer():
    from pelagos_bpf.net import layout as netlay

    assert len(netlay.LAYER.progs) >= 2  # the point: a set of programs sharing maps
    return netlay.LAYER


@pytest.mark.root  # mounts a bpffs
def test_a_half_pinned_set_is_replaced_whole(pin_fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that died after pinning part of a set must not block the next ones: the set
    is loaded and pinned again, whole, under the pin dir's lock."""

    layer = _net_layer()
    dead = _own_load(monkeypatch, layer)
    feat = Feature(layer)
    paths = pins.pin_paths(layer, str(pin_fs))
    first = layer.progs[0].func
    bpfsys.obj_pin(dead.progs[first], paths[first])  # the dead writer got this far
    loaded = feat.loaded()
    try:
        assert loaded.ids[first] != dead.ids[first]
        for func, path in paths.items():  # every pin now holds this load's program
            fd = bpfsys.obj_get(path)
            try:
                assert bpfsys.prog_info(fd).id == loaded.ids[func]
            finally:
                os.close(fd)
        other = Feature(layer).loaded()  # and the next process fetches that set
        assert other.ids == loaded.ids
        other.close()
    finally:
        loaded.close()
        dead.close()


@pytest.mark.root  # mounts a bpffs
def test_a_mixed_set_is_not_handed_out(pin_fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins whose programs come from two loads (they do not share maps) are not a set: a
    fetch would write settings one program never reads. The set is replaced."""

    layer = _net_layer()
    a, b = _own_load(monkeypatch, layer), _own_load(monkeypatch, layer)
    feat = Feature(layer)
    paths = pins.pin_paths(layer, str(pin_fs))
    for i, (func, path) in enumerate(paths.items()):
        bpfsys.obj_pin((a if i % 2 == 0 else b).progs[func], path)
    dirfd = trust.check_pin_dir(pin_fs)
    try:
        assert pins.from_pins(layer, dirfd, paths) is None
    finally:
        os.close(dirfd)
    loaded = feat.loaded()
    try:
        assert not set(loaded.ids.values()) & {*a.ids.values(), *b.ids.values()}
        maps_of = {bpfsys.map_info(fd).id for fd in loaded.maps.values()}
        for fd in loaded.progs.values():
            assert set(bpfsys.prog_info(fd).map_ids) <= maps_of
    finally:
        loaded.close()
        a.close()
        b.close()


def test_pin_names_change_with_any_program_of_the_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """One suffix per set over every program's bytecode: a release that changes (or adds) one
    program gets all new names, so an older set is never completed with newer programs."""

    layer = _net_layer()
    idents = pins.idents(layer)
    before = pins.pin_paths(layer, "/p", idents)
    last = layer.progs[-1].func
    changed = {**idents, last: idents[last]._replace(digest="0" * 64)}
    after = pins.pin_paths(layer, "/p", changed)
    assert all(before[f] != after[f] for f in before)
    assert len({p.rsplit("_", 1)[1] for p in after.values()}) == 1
