"""The hook's two stages: attach at create (createRuntime/prestart), clean up at poststop.

Failure policy (docs/OCI_HOOK.md): exit 2, which makes the runtime fail the container start,
only when the container asked for something (a `linux.resources.network` field or an
`io.pelagos-bpf.*` annotation) that the hook cannot parse, may not have (the admin policy) or
cannot apply; before anything is attached when the input is bad, and with what was attached
undone when an attach fails. Everything else is a warning on stderr and exit 0: unknown
`io.pelagos-bpf.*` keys, any poststop problem (the container is gone by then), and every
failure under `io.pelagos-bpf.best-effort: true`. No input makes it raise.

The hook acts as owner "hook" (pelagos_bpf.owners): its device rules are a set of their own,
AND-ed by the kernel with the runtime's (an `allow` in an annotation never overrides another
owner's deny), and create's rollback and poststop remove only the hook's set and the net
settings the hook itself holds. A cgroup whose net settings the runtime holds refuses the
hook's (OwnerConflict, exit 2). Poststop finds the cgroup through the record create left
(records.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..errors import PelagosError
from ..owners import HOOK
from . import inputs, locate
from .request import (
    A_BEST_EFFORT,
    A_DEVICES,
    HookError,
    Request,
    State,
    build_request,
    parse_state,
    pod_namespace,
    section,
    stage_of,
    string_map,
)

# Imported where used: the paths that attach nothing load neither the library nor the policy,
# and the records (with the trust checks) only when there is one to read or write.
if TYPE_CHECKING:
    from ..policy import Policy
    from .records import Record, Records
    from .runtime import Runtime

__all__ = ["Result", "prune_records", "run_hook", "state_dir"]

STAGES = ("auto", "create", "poststop")
DETECT: Final = "detect"
ENTRIES_LOCK = "hook-namespace-entries"  # serialises the per-namespace quota check and record
MAX_MESSAGE = 2000  # a message quotes the value it refuses: keep a huge annotation out of logs
DEBUG_ENV = "PELAGOS_BPF_DEBUG"


@dataclass
class Result:
    """Exit status plus the lines the CLI prints on stderr (`done` only with --verbose)."""

    code: int = 0
    container: str = "?"
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


def read_bundle_config(bundle: str) -> dict[str, Any]:
    """<bundle>/config.json: a regular file, bounded, strict JSON (inputs.py)."""
    path = os.path.join(bundle, "config.json")
    raw = inputs.read_regular_file(path, "config.json")
    if raw is None:
        raise HookError(f"bundle {bundle}: no config.json there (state.bundle wrong?)")
    data = inputs.loads(raw, f"config.json {path}")
    if not isinstance(data, dict):
        raise HookError(f"config.json {path}: not a JSON object")
    return data


# ---------------------------------------------------------------- create


def create(
    state: State, req: Request, namespace: str | None = None, pol: Policy | None = None
) -> list[str]:
    """Check everything, then attach net and device settings as owner "hook"; undo the hook's
    own on a failure. `pol` (the admin policy, when annotations asked for something) holds the
    namespace's quota of rule-map entries."""
    if req.empty:
        return []
    if state.pid is None:
        raise HookError("state.pid is missing: the create stage needs the container's process")
    from .. import devices, net
    from ..cgref import Ref  # not Cgroup: the hook needs none of the controller code it loads
    from ..net.plan import carried_in
    from .records import Record, Records

    cg = Ref(*locate.cgroup_dir_of_pid(state.pid))
    plan = net.resolve_net(req.classid, req.priorities, state.pid) if req.wants_net else None
    rules = req.device_rules() if req.wants_devices else []
    entries = _entries(rules)
    if plan is None and not rules:  # an audit with an empty mirror and no rules of its own
        return [f"cgroup {cg.path}: nothing to attach (the mirror of the runtime's rules is empty)"]
    with Records(create=True) as recs:
        _reserve(recs, Record(state.id, str(cg.path), cg.id, namespace, entries), pol)
        done: list[str] = []
        try:
            if plan is not None:  # first: a cgroup whose net the runtime holds refuses here
                net.update_net(cg, plan, owner=HOOK)
                done.append(f"net classid {plan.classid:#x} carried in {carried_in(plan.carrier)}")
                if plan.priorities:
                    done.append(
                        "net priorities " + ", ".join(f"{n}={p}" for n, _, p in plan.priorities)
                    )
            if rules:
                devices.update_devices(cg, rules, owner=HOOK)
                done.append(
                    f"device set of the hook: {len(req.runtime_device_rules)} mirrored and "
                    f"{len(req.extra_device_rules)} own rule(s), {entries} entries, denials "
                    "counted"
                )
        except BaseException as exc:
            for undo in (net.detach_net, devices.detach_devices):  # the hook's own state only
                try:
                    undo(cg, owner=HOOK)
                except Exception as e:
                    exc.add_note(f"rollback: {e}")
            recs.remove(state.id)
            raise
    return [f"cgroup {cg.path} (id {cg.id}): " + "; ".join(done)]


def _entries(rules: list[Any]) -> int:
    """Rule-map entries the set takes; the per-set limit, checked before anything is written
    (ConfigError naming the annotation and $PELAGOS_BPF_RULES_PER_SET)."""
    if not rules:
        return 0
    from .. import devices
    from ..devices import program

    program.check_size(rules, A_DEVICES)
    devices.validate_device_rules(rules)
    return program.prepare(rules, validated=True).n_entries


def _reserve(recs: Records, rec: Record, pol: Policy | None) -> None:
    """Write the record, after the namespace's entry quota admits it: under a node lock, so two
    hooks of one namespace cannot both take the last room (the record is the reservation; a
    failed create removes it)."""
    if not rec.entries or pol is None:
        recs.write(rec)
        return
    from ..locks import node_lock

    with node_lock(ENTRIES_LOCK):
        in_use = recs.entries_of(rec.namespace)
        try:
            old = recs.read(rec.id)  # a second create of the container replaces its record
        except (HookError, PelagosError, OSError):
            old = None
        if old is not None and old.namespace == rec.namespace and old.alive():
            in_use -= old.entries
        pol.check_entries(rec.namespace, in_use, rec.entries, A_DEVICES)
        recs.write(rec)


# ---------------------------------------------------------------- poststop


def poststop(state: State) -> list[str]:
    """Remove the hook's own settings if the cgroup still exists (its removal frees the
    attachments otherwise). Reads the record create left, from a trusted directory only."""
    from .records import Records, record_path

    if not os.path.lexists(record_path(state.id)):
        return []  # create attached nothing: no need to load the trust checks to know it
    recs = Records.open_existing()
    if recs is None:
        return []  # no create ever left a record here
    with recs:
        try:
            rec = recs.read(state.id)
        except HookError as e:
            recs.remove(state.id)  # malformed, in our own directory: gc would keep it forever
            raise HookError(f"{e}; removed, nothing detached") from None
        if rec is None:
            return []  # create attached nothing (or never ran)
        msg = f"cgroup {rec.cgroup}: removed by the runtime (its programs went with it)"
        if rec.alive():
            from .. import devices, net
            from ..cgref import Ref

            cg = Ref.of(Path(rec.cgroup))
            kept = not net.detach_net(cg, owner=HOOK)
            devices.detach_devices(cg, owner=HOOK)
            msg = f"cgroup {rec.cgroup}: the hook's device set and net settings removed" + (
                " (its net settings belong to another owner: kept)" if kept else ""
            )
        recs.remove(state.id)
        stale = recs.prune()
    return [msg] + (
        [f"removed {stale} stale record(s) of containers whose poststop never ran"] if stale else []
    )


def state_dir() -> Path:
    """Where the records are ($PELAGOS_BPF_HOOK_STATE; records.state_dir, for the agent)."""
    from .records import state_dir

    return state_dir()


def prune_records(directory: Path) -> int:
    """Delete the records of cgroups that are gone (Records.prune; for the agent's gc)."""
    from .records import Records

    with Records(directory) as recs:
        return recs.prune()


# ---------------------------------------------------------------- entry point


def _text(e: BaseException) -> str:
    text = str(e) + "".join(f" ({n})" for n in getattr(e, "__notes__", ()))
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} more characters)"
    return text


def _internal(e: Exception) -> str:
    """A bug, not bad input: one line (the traceback with $PELAGOS_BPF_DEBUG)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        import traceback

        return f"internal error: {traceback.format_exc()}"
    return f"internal error (a bug; {DEBUG_ENV}=1 shows where): {type(e).__name__}: {_text(e)}"


def _is_true(text: str | None) -> bool:
    return (text or "").strip(" \t").lower() in ("1", "true", "yes", "on")


def run_hook(
    raw_state: str | bytes,
    stage: str = "auto",
    *,
    runtime: Runtime | str | Callable[[], tuple[Runtime | None, str]] | None = DETECT,
    policy: Policy | None = None,
) -> Result:
    """Run one hook invocation on the OCI state text; never raises for any input.

    runtime: the OCI runtime the hook serves ("runc", "crun", None: unknown), DETECT
    (runtime.detect: $PELAGOS_BPF_HOOK_RUNTIME, else this process's parent), or a function
    returning (runtime, how it was found), called only when the device mirror needs it.
    policy: the admin policy to apply; None loads it (policy.load) when annotations ask for
    something.
    """
    res = Result()
    best_effort = False
    poststop_stage = stage == "poststop"  # until the state says, for input it cannot parse
    try:
        state = parse_state(inputs.loads(raw_state, "state on stdin"))
        res.container = state.id
        best_effort = _is_true(state.annotations.get(A_BEST_EFFORT))
        if stage_of(state, stage) == "poststop":
            poststop_stage = True
            res.done += poststop(state)
            return res
        config = read_bundle_config(state.bundle)
        config_ann = string_map(config.get("annotations"), "config.json annotations")
        namespace = pod_namespace(state.annotations, config_ann)
        ann = {**config_ann, **state.annotations}  # the state carries config.json's: prefer it
        best_effort = _is_true(ann.get(A_BEST_EFFORT))
        req = build_request(ann, config)
        best_effort = req.best_effort
        res.warnings += req.warnings
        pol = None
        if req.claim is not None:  # the annotations ask for something: the policy decides
            from .. import policy as policy_mod

            pol = policy if policy is not None else policy_mod.load()
            pol.check(namespace, req.claim)
            res.done.append(f"policy {pol.source}: {policy_mod.namespace_label(namespace)}")
        if req.wants_devices:
            _mirror(req, config, runtime, res)
        res.done += create(state, req, namespace, pol)
    except (HookError, PelagosError, OSError) as e:
        _fail(res, _text(e), best_effort, poststop_stage)
    except Exception as e:
        _fail(res, _internal(e), best_effort, poststop_stage)
    return res


def _mirror(req: Request, config: dict[str, Any], runtime: Any, res: Result) -> None:
    """Fill req.runtime_device_rules with the copy of the runtime's rules (mirror.py)."""
    from . import mirror
    from . import runtime as runtime_mod

    how = "given by the caller"
    if runtime == DETECT:
        runtime, how = runtime_mod.detect()
    elif callable(runtime):  # the caller's lookup, run only when a mirror is wanted
        runtime, how = runtime()
    linux = section(config, "linux", "linux")
    req.runtime_device_rules, warning = mirror.mirror(linux, runtime)
    if warning:
        res.warnings.append(warning)
    res.done.append(f"runtime {runtime or 'unknown'} ({how})")


def _fail(res: Result, text: str, best_effort: bool, poststop_stage: bool) -> None:
    if poststop_stage:
        res.warnings.append(f"poststop: {text}")
    elif best_effort:
        res.warnings.append(f"{text} (ignored: best-effort; nothing attached)")
    else:
        res.errors.append(text)
        res.code = 2


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
