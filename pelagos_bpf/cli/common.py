"""What every subcommand shares: exit codes, the CliError, and turning failures into one line.

Why a translation layer: the library names Python fields (`memory_limit`) and carries errnos;
an operator typed flags (`--memory`) and wants to know what to do next. The mapping lives here
once, so every command words the same failure the same way.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
from pathlib import Path
from typing import NoReturn

from ..errors import (
    CgroupError,
    ConfigError,
    PelagosError,
    UnsupportedSetting,
    UnsupportedSettings,
)

EXIT_OK = 0
EXIT_DENIED = 1  # `devices check`: the access would be denied
EXIT_TOOL = 125  # pelagos-bpf itself failed (bad flags, setup refused, not a cgroup, ...)
EXIT_CANNOT_EXEC = 126  # `run`: the command exists but cannot be executed
EXIT_NOT_FOUND = 127  # `run`: the command was not found

EXIT_CODES_HELP = """\
exit status:
  0        success (run: the command exited 0)
  1..124   run: the command's own exit status, passed through
  125      pelagos-bpf itself failed (bad flag, setting refused, not a cgroup, needs root)
  126      run: the command cannot be executed
  127      run: the command was not found
  128+N    run: stopped by signal N (SIGTERM/SIGHUP/SIGINT forwarded to the command), or the
           command was killed by signal N
  devices check: 0 allowed, 1 denied, 125 error"""

NEEDS_ROOT = "needs root (or a delegated subtree with --root)"
BPF_NEEDS_ROOT = "needs root (CAP_BPF and CAP_SYS_ADMIN for bpf(2))"


class CliError(Exception):
    """An expected failure: `message` is the whole story; `code` the exit status."""

    def __init__(self, message: str, code: int = EXIT_TOOL) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with usage errors exiting 125 (the tool's own failure), not 2: a command's
    own exit status 2 must not read as a typo in pelagos-bpf's flags."""

    def error(self, message: str) -> NoReturn:
        self.print_usage()
        self.exit(EXIT_TOOL, f"{self.prog}: error: {message}\n")


# CgroupConfig field -> the flag that sets it (run / update).
FLAGS = {
    "memory_limit": "--memory",
    "memory_swap": "--memory-swap",
    "memory_reservation": "--memory-reservation",
    "memory_swappiness": "--memory-swappiness",
    "cpu_shares": "--cpu-shares",
    "cpu_quota": "--cpu-quota",
    "cpuset_cpus": "--cpuset-cpus",
    "cpuset_mems": "--cpuset-mems",
    "pids_limit": "--pids",
    "blkio_weight": "--blkio-weight",
    "blkio_throttle_read_bps": "--read-bps",
    "blkio_throttle_write_bps": "--write-bps",
    "blkio_throttle_read_iops": "--read-iops",
    "blkio_throttle_write_iops": "--write-iops",
    "device_rules": "--device",
    "net_classid": "--net-classid",
    "net_priorities": "--net-prio",
    "path": "--path",
}
_SETTING = re.compile(r"^([a-z_]+)(?:\[(\d+)\])?(?:\.(\w+))?$")


def flag_for(setting: str, rule_offset: int = 0) -> str:
    """ "memory_limit" -> "--memory"; "device_rules[3].kind" -> "--device #4 (kind)".

    `rule_offset` is how many rules --default-devices put before the user's own --device.
    Settings the CLI has no flag for (e.g. an OCI path) come back unchanged."""
    flags = []
    for part in setting.split("+"):  # io.max writes name several settings at once
        m = _SETTING.match(part)
        if not m or m.group(1) not in FLAGS:
            flags.append(part)
            continue
        field, index, sub = m.groups()
        flag = FLAGS[field]
        if index is not None:
            i = int(index) - (rule_offset if field == "device_rules" else 0)
            flag += f" #{i + 1}" if i >= 0 else " (from --default-devices)"
        if sub and field != "cpu_quota":
            flag += f" ({sub})"
        flags.append(flag)
    return "/".join(dict.fromkeys(flags))


def _flag_words(reason: str, flag: str) -> str:
    """Reword a library reason for flag users: no `None`, flags instead of field names."""
    reason = re.sub(r"use None \(unset\)", f"omit {flag} (unset)", reason)
    reason = re.sub(r"use None to", f"omit {flag} to", reason)
    for field, f in FLAGS.items():
        reason = re.sub(rf"\b{field}\b", f, reason)
    return reason


def os_message(e: BaseException) -> str:
    """An error's text without the "[Errno N]" prefix, with the file an OSError is about."""
    text = getattr(e, "strerror", None) or str(e)
    filename = getattr(e, "filename", None)
    if filename is not None:
        text = f"{filename}: {text}"
    return re.sub(r"^\[Errno \d+\] ", "", text)


def describe(e: BaseException, *, best_effort_hint: bool = False, rule_offset: int = 0) -> str:
    """One line (or one line per setting) saying what failed and what to do."""
    if isinstance(e, CliError):
        return str(e)
    if isinstance(e, ConfigError):
        flag = flag_for(e.setting, rule_offset)
        shown = e.value if isinstance(e.value, str) else repr(e.value)
        return f"{flag} {shown}: {_flag_words(e.reason, flag)}"
    if isinstance(e, UnsupportedSetting):
        problems = e.problems if isinstance(e, UnsupportedSettings) else [(e.setting, e.reason)]
        lines = [f"{flag_for(s, rule_offset)}: {r}" for s, r in problems]
        if best_effort_hint:
            lines.append("use --best-effort to skip what this host cannot apply")
        return "\n".join(lines)
    if isinstance(e, OSError):
        text = os_message(e)
        if e.errno in (errno.EPERM, errno.EACCES) and os.geteuid() != 0:
            text += f": {NEEDS_ROOT if isinstance(e, CgroupError) else 'needs root'}"
        return text
    if isinstance(e, PelagosError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def cgroup_dir(path: str, root: str | None = None) -> Path:
    """The cgroup directory a PATH argument names (relative: under the root), or CliError."""
    from ..hierarchy import discover

    p = Path(path)
    if not p.is_absolute():
        p = discover(root).root / p
    if not (p / "cgroup.procs").is_file():
        why = "no such directory" if not p.exists() else "no cgroup.procs in it"
        raise CliError(f"not a cgroup: {p} ({why})")
    return p
