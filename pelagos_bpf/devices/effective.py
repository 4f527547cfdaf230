"""Would an access to a device be allowed in a cgroup? Every program in effect, asked.

Why not just our rules: the kernel allows a device access only if EVERY device program in effect
on the cgroup allows it (ours of each owner, the runtime's own, systemd's, those attached at any
ancestor with BPF_F_ALLOW_MULTI) and, on a hybrid host, the cgroup v1 devices controller too. An
answer built from our rules alone says "allowed" where the runtime's program denies.

So each source gets a verdict:
- ours: decided from the rule set in the maps, exactly as the program decides (the same
  encoding model the tests hold to the bytecode), with the rule that decided;
- a foreign program: run on the access in pelagos_bpf.devices.interp (no kernel supports
  BPF_PROG_TEST_RUN for cgroup_device); one it cannot run (helper calls, maps) is reported as
  "may deny", never guessed;
- the v1 devices controller: the whitelist of the v1 cgroup the cgroup's first process is in.

The access is allowed when every verdict allows, denied when any denies, unknown otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import bpfsys
from ..cgref import open_dir
from ..hierarchy import discover
from ..loader import open_maps, open_prog
from ..owners import OWNER_IDS
from . import encode as enc
from . import layout as lay
from .interp import NotEvaluable, run_foreign
from .program import FEATURE, read_cur, read_entries
from .rules import deciding_rules


@dataclass(frozen=True)
class Verdict:
    source: str  # what decided: "the hook's rules at /sys/fs/cgroup/x", "program id 9 at ..."
    allowed: bool | None  # None: cannot tell (may deny)
    why: str


@dataclass(frozen=True)
class Check:
    verdicts: tuple[Verdict, ...]

    @property
    def allowed(self) -> bool | None:
        """False if any source denies, True if all allow, None (may deny) otherwise."""
        if any(v.allowed is False for v in self.verdicts):
            return False
        return True if all(v.allowed for v in self.verdicts) else None


def _attached_along(path: Path, root: Path) -> list[tuple[Path, int]]:
    """(cgroup dir, program id) of every device program attached at `path` or an ancestor up
    to `root`, nearest first, restricted to those the kernel has in effect at `path`."""
    fd = open_dir(path)
    try:
        effective = set(bpfsys.prog_query(fd, lay.ATTACH, effective=True))
    finally:
        os.close(fd)
    out: list[tuple[Path, int]] = []
    d = path
    while True:
        fd = open_dir(d)
        try:
            out += [(d, i) for i in bpfsys.prog_query(fd, lay.ATTACH) if i in effective]
        finally:
            os.close(fd)
        if d == root or d.parent == d:
            return out
        d = d.parent


def _ours(
    d: Path, info: bpfsys.ProgInfo, kind: str, major: int, minor: int, access: str
) -> Verdict | None:
    """The verdict of one of our programs attached at `d`; None when it is not ours."""
    hit = FEATURE.recognise(info)
    if hit is None:
        return None
    layer, spec = hit
    if layer.version != lay.VERSION:
        return Verdict(
            f"an earlier release's device program (id {info.id}) at {d}",
            None,
            "not evaluated here: `pelagos-bpf update` (or any runtime write) migrates it",
        )
    owner = lay.OWNER_OF_FUNC[spec.func]
    source = f"the {owner}'s rules at {d} (program id {info.id})"
    maps = open_maps(info, layer)
    try:
        cgroup_id = os.stat(d).st_ino
        gen = read_cur(maps, cgroup_id)[0][OWNER_IDS[owner]]
        entries = read_entries(maps, cgroup_id, gen, OWNER_IDS[owner]) if gen else None
    finally:
        for m in maps.values():
            os.close(m)
    if entries is None:
        return Verdict(source, False, "denied: rule set not installed")
    rules = enc.decode_rules(entries)
    type_ = enc.TYPES[kind]
    allowed = enc.decide(entries, type_, major, minor, enc.access_mask(access))
    parts = []
    for bit, idx in deciding_rules(rules, kind, major, minor, access).items():
        said = "no rule (allowed)" if idx is None else f"rule {idx} {rules[idx]}"
        parts.append(f"{bit}: {said}")
    return Verdict(source, allowed, "; ".join(parts))


def _program_verdict(
    d: Path, prog_id: int, kind: str, major: int, minor: int, access: str
) -> Verdict:
    fd = open_prog(prog_id)
    if fd is None:
        return Verdict(f"program id {prog_id} at {d}", None, "gone, or not ours to read")
    try:
        info = bpfsys.prog_info(fd)
        ours = _ours(d, info, kind, major, minor, access)
        if ours is not None:
            return ours
        source = f"program id {info.id} ({info.name or 'unnamed'}, foreign) at {d}"
        try:
            insns = bpfsys.prog_xlated(fd)
            allowed = run_foreign(insns, enc.TYPES[kind], major, minor, enc.access_mask(access))
        except NotEvaluable as e:
            return Verdict(source, None, f"may deny: cannot be evaluated here ({e})")
        return Verdict(source, allowed, "interpreted on this access")
    finally:
        os.close(fd)


def _v1_whitelist_allows(lines: list[str], kind: str, major: int, minor: int, access: str) -> bool:
    """cgroup v1 devices.list semantics: allowed if one entry covers the device and every
    requested bit ('a *:* rwm' when nothing is restricted)."""
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        t, num, acc = parts
        ma, _, mi = num.partition(":")
        if t not in ("a", kind):
            continue
        if ma != "*" and ma != str(major):
            continue
        if mi != "*" and mi != str(minor):
            continue
        if set(access) <= set(acc):
            return True
    return False


def _v1_mount() -> Path | None:
    """Where the v1 devices controller is mounted (hybrid hosts), if anywhere."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fs = post.split()
            if fs[:1] == ["cgroup"] and "devices" in fs[2].split(","):
                return Path(pre.split()[4])
    return None


def _v1_verdict(path: Path, kind: str, major: int, minor: int, access: str) -> Verdict | None:
    mount = _v1_mount()
    if mount is None:
        return None
    procs = (path / "cgroup.procs").read_text().split()
    if not procs:
        return Verdict(
            f"the cgroup v1 devices controller ({mount})",
            None,
            "may deny: no process in the cgroup, so its v1 devices cgroup is unknown",
        )
    try:
        text = Path(f"/proc/{procs[0]}/cgroup").read_text()
    except FileNotFoundError:
        return Verdict(f"the cgroup v1 devices controller ({mount})", None, "the process left")
    rel = "/"
    for line in text.splitlines():
        _, controllers, where = line.split(":", 2)
        if "devices" in controllers.split(","):
            rel = where
    v1 = mount / rel.lstrip("/")
    lines = (v1 / "devices.list").read_text().splitlines()
    allowed = _v1_whitelist_allows(lines, kind, major, minor, access)
    return Verdict(
        f"the cgroup v1 devices controller at {v1}",
        allowed,
        "its devices.list " + ("covers" if allowed else "does not cover") + " the access",
    )


def check_access(
    path: str | os.PathLike[str], kind: str, major: int, minor: int, access: str
) -> Check:
    """Every source's verdict on one access in the cgroup at `path`."""
    p = Path(os.path.realpath(path))
    root = discover().root
    verdicts = [
        _program_verdict(d, i, kind, major, minor, access) for d, i in _attached_along(p, root)
    ]
    v1 = _v1_verdict(p, kind, major, minor, access)
    if v1 is not None:
        verdicts.append(v1)
    return Check(tuple(verdicts))
