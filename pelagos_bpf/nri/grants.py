"""Device grants: the host's node for each granted MAJ:MIN, placed in the container adjustment.

Why a real node: NRI v0.8.0 grants a device only through the adjustment's `linux.devices`
(the node is created in the container and an allow rule for it added: pkg/runtime-tools/
generate AdjustDevices); `linux.resources.devices` of an adjustment is ignored. So a grant needs
the path of an existing node, found the way udev names it: /sys/dev/{char,block}/MAJ:MIN/uevent
has DEVNAME, relative to /dev. The node must be that device (type and rdev checked), so a
grant never injects a node the pod author did not name. The container sees it at the same path,
with the host node's mode, owner and group (as containerd's own host-device injection does).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..devices.rules import CgroupDeviceRule
from ..errors import ConfigError
from .api import ContainerAdjustment, LinuxDevice, OptionalFileMode, OptionalUInt32

SYS_DEV = Path("/sys/dev")
DEV = Path("/dev")
MAX_UEVENT = 4096
_SYS_KIND = {"c": "char", "b": "block"}
_S_IS = {"c": stat.S_ISCHR, "b": stat.S_ISBLK}


def devname(kind: str, major: int, minor: int, sys_dev: Path = SYS_DEV) -> str | None:
    """DEVNAME of the device (e.g. "fuse", "dri/card0"), None when the kernel has no such
    device or does not name a node for it."""
    try:
        with open(sys_dev / _SYS_KIND[kind] / f"{major}:{minor}" / "uevent", "rb") as f:
            text = f.read(MAX_UEVENT).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "DEVNAME":
            return value
    return None


def host_node(
    rule: CgroupDeviceRule, setting: str, sys_dev: Path = SYS_DEV, dev: Path = DEV
) -> LinuxDevice:
    """The adjustment's device for a grant (exact c/b MAJ:MIN, request.parse checked);
    ConfigError naming the annotation when the host has no node for it."""
    kind, major, minor = rule.kind, rule.major, rule.minor
    name = devname(kind, major, minor, sys_dev)
    where = sys_dev / _SYS_KIND[kind] / f"{major}:{minor}"
    if name is None:
        raise ConfigError(
            setting,
            str(rule),
            f"this node has no {_SYS_KIND[kind]} device {major}:{minor} "
            f"with a /dev node ({where}/uevent has no DEVNAME)",
        )
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(setting, str(rule), f"{where}/uevent: DEVNAME={name!r} is not a name")
    path = dev.joinpath(*parts)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(
            setting, str(rule), f"{path} (the device's node) does not exist"
        ) from None
    if not _S_IS[kind](st.st_mode) or st.st_rdev != os.makedev(major, minor):
        raise ConfigError(
            setting,
            str(rule),
            f"{path} is not the {_SYS_KIND[kind]} device {major}:{minor} (found "
            f"{stat.filemode(st.st_mode)[0]} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)})",
        )
    return LinuxDevice(
        path=str(path),
        type=kind,
        major=major,
        minor=minor,
        file_mode=OptionalFileMode(value=stat.S_IMODE(st.st_mode)),
        uid=OptionalUInt32(value=st.st_uid),
        gid=OptionalUInt32(value=st.st_gid),
    )


def adjustment(
    grants: tuple[CgroupDeviceRule, ...], setting: str, sys_dev: Path = SYS_DEV, dev: Path = DEV
) -> ContainerAdjustment | None:
    """The CreateContainer adjustment for the grants (None: no grant). Every node is found
    before any is added: one missing node refuses the whole request."""
    if not grants:
        return None
    adjust = ContainerAdjustment()
    seen: set[tuple[str, int, int]] = set()
    for rule in grants:
        if (rule.kind, rule.major, rule.minor) in seen:
            continue  # "allow c 10:229 r; allow c 10:229 w": one node
        seen.add((rule.kind, rule.major, rule.minor))
        adjust.linux.devices.append(host_node(rule, setting, sys_dev, dev))
    return adjust
