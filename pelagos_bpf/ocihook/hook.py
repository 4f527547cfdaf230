"""The hook's two stages: attach at create (createRuntime/prestart), clean up at poststop.

Failure policy (docs/OCI_HOOK.md): exit 2, which makes the runtime fail the container start,
only when the container asked for something (a `linux.resources.network` field or an
`io.pelagos-bpf.*` annotation) that the hook cannot parse or apply; before anything is attached
when the input is bad, and with what was attached undone when an attach fails. Everything else
is a warning on stderr and exit 0: unknown `io.pelagos-bpf.*` keys, any poststop problem (the
container is gone by then), and every failure under `io.pelagos-bpf.best-effort: true`.

Poststop cannot find the cgroup from the pid (the process is dead and the runtime may already
have removed the cgroup), so create leaves a small record (cgroup path and id) under
$PELAGOS_BPF_HOOK_STATE (default /run/pelagos-bpf/oci-hook), named by the container id.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PelagosError
from ..owners import HOOK
from . import locate
from .request import A_BEST_EFFORT, HookError, Request, State, build_request, parse_state, stage_of

if TYPE_CHECKING:  # imported where used: the paths that attach nothing never load the library
    from ..cgref import CgroupRef

STATE_DIR_ENV = "PELAGOS_BPF_HOOK_STATE"
DEFAULT_STATE_DIR = "/run/pelagos-bpf/oci-hook"
STAGES = ("auto", "create", "poststop")


@dataclass
class Result:
    """Exit status plus the lines the CLI prints on stderr (`done` only with --verbose)."""

    code: int = 0
    container: str = "?"
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def record_path(container_id: str, directory: Path | None = None) -> Path:
    """Where create leaves its record; ids that are not plain file names are hashed."""
    d = directory or state_dir()
    if re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,200}", container_id):
        return d / f"{container_id}.json"
    import hashlib  # here: it loads OpenSSL, ~12 ms of every hook exec otherwise

    return d / f"sha256-{hashlib.sha256(container_id.encode()).hexdigest()}.json"


def read_bundle_config(bundle: str) -> dict[str, Any]:
    p = Path(bundle) / "config.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise HookError(f"bundle {bundle}: no config.json there (state.bundle wrong?)") from None
    except (OSError, ValueError) as e:
        raise HookError(f"bundle {bundle}: cannot read config.json: {e}") from None
    if not isinstance(data, dict):
        raise HookError(f"bundle {bundle}: config.json is not a JSON object")
    return data


# ---------------------------------------------------------------- create


def _write_record(state: State, cg: CgroupRef) -> Path:
    path = record_path(state.id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"id": state.id, "cgroup": str(cg.path), "cgroup_id": cg.id}))
    os.replace(tmp, path)
    return path


def create(state: State, req: Request) -> list[str]:
    """Check everything, then attach net and device programs; undo all on a failure."""
    if req.empty:
        return []
    if state.pid is None:
        raise HookError("state.pid is missing: the create stage needs the container's process")
    from .. import devices, net
    from ..cgref import Ref  # not Cgroup: the hook needs none of the controller code it loads
    from ..net.plan import carried_in

    cg = Ref.of(locate.cgroup_of_pid(state.pid))
    plan = net.resolve_net(req.classid, req.priorities, state.pid) if req.wants_net else None
    rules = req.device_rules() if req.wants_devices else []
    devices.validate_device_rules(rules)
    record = _write_record(state, cg)
    done: list[str] = []
    try:
        if plan is not None:
            net.update_net(cg, plan, owner=HOOK)
            done.append(f"net classid {plan.classid:#x} carried in {carried_in(plan.carrier)}")
            if plan.priorities:
                done.append(
                    "net priorities " + ", ".join(f"{n}={p}" for n, _, p in plan.priorities)
                )
        if rules:
            devices.update_devices(cg, rules, owner=HOOK)
            done.append(
                f"device program: {len(req.extra_device_rules)} extra rule(s), denials counted"
            )
    except BaseException as exc:
        for undo in (net.detach_net, devices.detach_devices):  # the hook's own state only
            try:
                undo(cg, owner=HOOK)
            except Exception as e:
                exc.add_note(f"rollback: {e}")
        record.unlink(missing_ok=True)
        raise
    return [f"cgroup {cg.path} (id {cg.id}): " + "; ".join(done)]


# ---------------------------------------------------------------- poststop


def poststop(state: State) -> list[str]:
    """Detach ours if the cgroup still exists (its removal frees the attachments otherwise)."""
    path = record_path(state.id)
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return []  # create attached nothing (or never ran)
    except (OSError, ValueError) as e:
        path.unlink(missing_ok=True)
        raise HookError(f"record {path} unreadable ({e}); GC removes leftovers") from None
    cg_path = Path(rec["cgroup"])
    try:
        alive = os.stat(cg_path).st_ino == rec["cgroup_id"]
    except FileNotFoundError:
        alive = False
    msg = f"cgroup {cg_path}: removed by the runtime (its programs went with it)"
    if alive:
        from .. import devices, net
        from ..cgref import Ref

        cg = Ref.of(cg_path)
        net.detach_net(cg, owner=HOOK)
        devices.detach_devices(cg, owner=HOOK)
        msg = f"cgroup {cg_path}: the hook's programs detached, its map entries deleted"
    path.unlink(missing_ok=True)
    stale = prune_records(path.parent)
    return [msg] + (
        [f"removed {stale} stale record(s) of containers whose poststop never ran"] if stale else []
    )


def prune_records(directory: Path) -> int:
    """Delete records whose cgroup is gone: a create that failed after our hook ran gets no
    poststop (runc), and the kernel freed its attachments with the cgroup."""
    n = 0
    for rec in directory.glob("*.json"):
        try:
            data = json.loads(rec.read_text())
            if os.stat(data["cgroup"]).st_ino != data["cgroup_id"]:
                raise FileNotFoundError  # a new cgroup under the old name
        except FileNotFoundError:
            rec.unlink(missing_ok=True)
            n += 1
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours to judge
    return n


# ---------------------------------------------------------------- entry point


def run_hook(raw_state: str | bytes, stage: str = "auto") -> Result:
    """Run one hook invocation on the OCI state text; never raises for bad input."""
    res = Result()
    best_effort = False
    try:
        try:
            data = json.loads(raw_state)
        except ValueError as e:
            raise HookError(f"state on stdin is not JSON ({e})") from None
        state = parse_state(data)
        res.container = state.id
        best_effort = state.annotations.get(A_BEST_EFFORT, "").lower() in ("true", "1")
        if stage_of(state, stage) == "poststop":
            try:
                res.done += poststop(state)
            except (HookError, PelagosError, OSError) as e:
                res.warnings.append(f"poststop: {e}")
            return res
        config = read_bundle_config(state.bundle)
        ann = dict(config.get("annotations") or {})
        ann.update(state.annotations)  # the state carries config.json's; prefer the state
        req = build_request(ann, config)
        best_effort = req.best_effort
        res.warnings += req.warnings
        res.done += create(state, req)
    except (HookError, PelagosError, OSError) as e:
        text = str(e) + "".join(f" ({n})" for n in getattr(e, "__notes__", ()))
        if best_effort:
            res.warnings.append(f"{text} (ignored: best-effort; nothing attached)")
        else:
            res.errors.append(text)
            res.code = 2
    return res


def run_hook_io(raw_state: str | bytes, stage: str, verbose: bool, stderr: Any) -> int:
    """run_hook plus its stderr lines, prefixed so a runtime's log names us."""
    res = run_hook(raw_state, stage)
    prefix = f"pelagos-bpf oci-hook [{res.container}]"
    for line in res.errors:
        print(f"{prefix}: error: {line}", file=stderr)
    for line in res.warnings:
        print(f"{prefix}: warning: {line}", file=stderr)
    if verbose:
        for line in res.done:
            print(f"{prefix}: {line}", file=stderr)
    return res.code
