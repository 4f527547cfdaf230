"""Every library call the agent makes, in one module (the only one of agent/ that imports the
library's BPF and cgroup code).

Why one module: each request acts for an owner role ("runtime": a library caller or the CLI,
"hook": the OCI hook, "nri": the NRI plugin; issue 23), and the ownership rules live in the
library. Routing every call through here keeps that plumbing in one place. Functions take and
return JSON-ready values; library errors propagate (the server turns them into error replies).

Nothing here keeps state between calls: what the agent holds is read back from the kernel
(PROG_QUERY, the programs' cgroup-storage maps) and the hook records each time it is asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

from ..ocihook.hook import run_hook
from ..ocihook.runtime import runtime_of_parent
from ..owners import check_owner
from .codec import config_from_json

log = logging.getLogger("pelagos_bpf.agent")

HOOK = "hook"  # the owner a hook request acts for (protocol.OWNERS lists every role)


# ---------------------------------------------------------------- start-up


def configure(lock_timeout: float) -> None:
    """Bound every lock wait (a cgroup's writer lock, the node's locks): a stuck writer
    elsewhere must not hold the agent's request threads."""
    from .. import locks

    locks.LOCK_TIMEOUT = lock_timeout


_policy: Any = None  # the admin policy (pelagos_bpf.policy.Policy) of the hooks served


def reload_policy() -> str:
    """(Re)read the admin policy: at start and on SIGHUP; new containers only see the change.
    A file that fails to load keeps the previous policy in force (and says why); with none
    loaded yet, each hook request loads it itself and fails closed on the same error."""
    global _policy
    from ..policy import PolicyFileError, load

    try:
        _policy = load()
    except PolicyFileError as e:
        kept = "the previous policy stays" if _policy is not None else "hooks will refuse"
        log.error("policy not (re)loaded: %s; %s", e, kept)
        return f"error: {e}"
    log.info("policy loaded")
    return "loaded"


def current_policy() -> Any:
    """The admin policy in force (pelagos_bpf.policy.Policy), for the NRI plugin: the one
    loaded at start or on SIGHUP; with none loaded (the file failed), loaded now, so a request
    is refused with the file's error (PolicyFileError) as a hook's would be."""
    if _policy is not None:
        return _policy
    from ..policy import load

    return load()


def load_programs() -> list[dict[str, Any]]:
    """Load (or fetch from the pins) every feature's programs now, once for the agent's life:
    the first container then pays no PROG_LOAD."""
    from ..registry import FEATURES

    for feat in FEATURES:
        feat.loaded()
    return programs()


def programs() -> list[dict[str, Any]]:
    """The programs this process loaded (or fetched from pins): feature, name, id."""
    from ..registry import FEATURES

    out = []
    for feat in FEATURES:
        got = feat.loaded_if_any()
        if got is not None:
            for func, prog_id in got.ids.items():
                out.append({"feature": feat.name, "name": got.layer.prog(func).name, "id": prog_id})
    return out


# ---------------------------------------------------------------- the OCI hook


def hook(
    stage: str, raw_state: bytes, owner: str = HOOK, client_pid: int | None = None
) -> tuple[int, str, str | None]:
    """One hook invocation, as `pelagos-bpf oci-hook STAGE` would run it: (exit code, stderr
    text, the INFO line saying what was done or None). The caller logs that line once the
    reply is sent: runtimes show a hook's stderr only when it fails, and formatting and writing
    a log line is a tenth of a create, which the container's start need not wait for. Never
    raises: an unexpected error is a failed create (exit 2), logged whole.

    owner: always "hook" (the protocol gives HOOK frames no other). client_pid: the thin hook's
    pid (SO_PEERCRED): its parent is the runtime whose device rules the hook's copy mirrors."""
    if owner != HOOK:
        return 2, f"pelagos-bpf oci-hook: error: a hook acts for the hook, not the {owner}", None

    def runtime() -> tuple[Any, str]:  # only for a device mirror: two /proc reads
        if not client_pid:
            return None, "no client pid"
        return runtime_of_parent(client_pid), f"the parent of the thin hook {client_pid}"

    try:
        res = run_hook(raw_state, stage, runtime=runtime, policy=_policy)
    except Exception as e:
        log.error("hook %s: internal error:\n%s", stage, traceback.format_exc())
        return 2, f"pelagos-bpf oci-hook: error: internal error in the agent: {e!r}", None
    prefix = f"pelagos-bpf oci-hook [{res.container}]"
    lines = [f"{prefix}: error: {x}" for x in res.errors]
    lines += [f"{prefix}: warning: {x}" for x in res.warnings]
    done = f"{prefix} {stage}: {'; '.join(res.done)}" if res.done else None
    return res.code, "\n".join(lines), done


def hook_stage(stage: str, raw_state: bytes) -> str:
    """The stage an "auto" request resolves to, from the state's status (for the agent's
    counters: hooks.d runs one entry for both stages); "auto" when it cannot tell."""
    if stage != "auto":
        return stage
    from ..ocihook.request import CREATE_STATUSES, STOP_STATUSES

    try:
        status = json.loads(raw_state).get("status")
    except (ValueError, RecursionError, AttributeError):
        return stage
    return (
        "create" if status in CREATE_STATUSES else "poststop" if status in STOP_STATUSES else stage
    )


# ---------------------------------------------------------------- library calls for clients


def _cgroup(path: Any) -> Any:
    """A handle for an existing cgroup dir below the cgroup2 root; ConfigError names the path
    when it is not one (checked before anything is done)."""
    from ..cgroup import Cgroup
    from ..errors import ConfigError
    from ..hierarchy import discover

    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError("path", path, "want the absolute path of a cgroup directory")
    p = Path(os.path.normpath(path))
    root = discover().root
    if root not in p.parents or not (p / "cgroup.procs").is_file():
        raise ConfigError("path", path, f"not a cgroup directory below {root}")
    return Cgroup.open(p, root=root)


def _runtime_only(owner: str, op: str) -> None:
    """Creating and removing cgroups is the runtime's (the hook and the NRI plugin act on
    cgroups their runtime made)."""
    from ..errors import ConfigError

    if check_owner(owner) != "runtime":
        raise ConfigError("owner", owner, f"{op} creates or removes cgroups: the runtime's call")


def _report(report: Any) -> dict[str, Any]:
    return {
        "applied": list(report.applied),
        "skipped": [list(s) for s in report.skipped],
        "written": [list(w) for w in report.written],
    }


def setup(
    cfg_json: dict[str, Any],
    pid: int | None,
    owner: str,
    *,
    strict: bool = True,
    net_carrier: str | None = None,
) -> dict[str, Any]:
    """setup_cgroup for `owner`: {path, id, created, report}. `created` (the dirs setup made)
    is the caller's to keep and hand back to teardown: the agent remembers nothing. Creating
    (and removing) a cgroup is the runtime's: another owner is refused."""
    from ..cgroup import setup_cgroup

    _runtime_only(owner, "setup")
    cfg = config_from_json(cfg_json)
    cg = setup_cgroup(cfg, pid, strict=strict, net_carrier=net_carrier)
    return {
        "path": str(cg.path),
        "id": cg.id,
        "created": [str(p) for p in cg.created],
        "report": _report(cg.report),
    }


def update(path: str, cfg_json: dict[str, Any], owner: str) -> dict[str, Any]:
    """update_cgroup for `owner`: only what cfg_json names changes. Returns the report."""
    from ..cgroup import update_cgroup

    cg = _cgroup(path)
    report = update_cgroup(cg, config_from_json(cfg_json), owner=check_owner(owner))
    return {"path": str(cg.path), "report": _report(report)}


def teardown(path: str, owner: str, created: list[str] | None = None) -> dict[str, Any]:
    """teardown_cgroup for `owner`; `created` (from setup's reply) names the ancestors setup
    made, removed too when empty. Only ancestors of `path` are accepted there."""
    from ..errors import ConfigError

    _runtime_only(owner, "teardown")
    cg = _cgroup(path)
    dirs = []
    for c in created or []:
        p = Path(os.path.normpath(c)) if isinstance(c, str) else None
        if p is None or (p != cg.path and p not in cg.path.parents) or p == cg.root:
            raise ConfigError("created", c, f"not {cg.path} or one of its ancestors")
        dirs.append(p)
    cg.created = dirs
    from ..cgroup import teardown_cgroup

    teardown_cgroup(cg)
    return {"path": str(cg.path), "removed": True}


def inspect(path: str | None = None) -> Any:
    """What is in force on one cgroup (the document of `pelagos-bpf inspect --json`, plus the
    container id a hook record gives), or with no path every cgroup the agent holds."""
    if path is None:
        return {"cgroups": held()}
    from ..cli.show import inspect_doc

    cg = _cgroup(path)
    doc, _stats = inspect_doc(cg.path)
    doc["container"] = hook_records().get(cg.id)
    return doc


def gc() -> dict[str, Any]:
    """One garbage collection: entries of dead cgroups, stale pins (the GcReport), and hook
    records of cgroups that are gone (a create the runtime failed gets no poststop)."""
    from .. import gc as gc_mod
    from ..ocihook.hook import prune_records, state_dir

    report = gc_mod.collect()
    records = prune_records(state_dir()) if state_dir().is_dir() else 0
    return {
        **dataclasses.asdict(report),
        "total_entries": report.total_entries,
        "records_removed": records,
    }


# ---------------------------------------------------------------- what the agent holds


def hook_records() -> dict[int, str]:
    """cgroup id -> container id, from the hook's records ($PELAGOS_BPF_HOOK_STATE), read
    through the records' trust checks (a record someone else could have planted names
    nothing). No state dir, or an untrusted one: no names."""
    from ..errors import PelagosError
    from ..ocihook.records import Records

    out: dict[int, str] = {}
    try:
        recs = Records.open_existing()
        if recs is None:
            return out
        with recs:
            for _, rec in recs.each():
                out[rec.cgroup_id] = rec.id
    except (OSError, PelagosError):
        return {}
    return out


def _our_programs() -> tuple[dict[int, str], dict[int, tuple[Any, dict[str, int]]]]:
    """Every program of ours the kernel holds (any version, any process): prog id -> feature,
    and map id -> (its layer, fds of that program's maps) for one program per map set."""
    from .. import bpfsys
    from ..loader import open_maps, open_prog
    from ..registry import FEATURES

    progs: dict[int, str] = {}
    sets: dict[int, tuple[Any, dict[str, int]]] = {}
    for prog_id in bpfsys.prog_ids():
        fd = open_prog(prog_id)
        if fd is None:
            continue
        try:
            info = bpfsys.prog_info(fd)
        finally:
            os.close(fd)
        for feat in FEATURES:
            hit = feat.recognise(info)
            if hit is None:
                continue
            progs[prog_id] = feat.name
            if not any(m in sets for m in info.map_ids):
                try:
                    maps = open_maps(info, hit[0])
                except OSError:
                    continue  # a foreign program with one of our names
                for m in info.map_ids:
                    sets[m] = (hit[0], maps)
    return progs, sets


def _close_sets(sets: dict[int, tuple[Any, dict[str, int]]]) -> None:
    closed: set[int] = set()
    for _layer, maps in sets.values():
        for fd in maps.values():
            if fd not in closed:
                closed.add(fd)
                os.close(fd)


def _unique_sets(sets: dict[int, tuple[Any, dict[str, int]]]) -> list[tuple[Any, dict[str, int]]]:
    seen: set[int] = set()
    out = []
    for layer, maps in sets.values():
        if id(maps) not in seen:
            seen.add(id(maps))
            out.append((layer, maps))
    return out


def held() -> list[dict[str, Any]]:
    """Every cgroup with a program of ours attached: {id, path, container, features}.

    From the kernel only: the cgroup-storage maps of our programs name each cgroup they were
    attached to (keys: cgroup id, attach type); each is opened by its id and confirmed with
    PROG_QUERY (storage can outlive a detach until the cgroup is freed). Container ids come from
    the hook records. A restarted agent therefore sees exactly what a killed one held."""
    from .. import bpfsys
    from ..bpfsys import MapType
    from ..cgref import Liveness
    from ..hierarchy import discover
    from ..layers import STORAGE_KEY

    progs, sets = _our_programs()
    try:
        candidates: dict[int, set[int]] = {}  # cgroup id -> attach types seen in storage
        for layer, maps in _unique_sets(sets):
            for spec in layer.maps:
                if spec.type != MapType.CGROUP_STORAGE or spec.name not in maps:
                    continue
                for key in bpfsys.map_keys(maps[spec.name], spec.key_size):
                    cgroup_id, attach_type = STORAGE_KEY.unpack(key)
                    candidates.setdefault(cgroup_id, set()).add(attach_type)
    finally:
        _close_sets(sets)
    records = hook_records()
    out = []
    with Liveness(discover().root) as live:
        for cgroup_id, types in sorted(candidates.items()):
            fd = live.open(cgroup_id)
            if fd is None:
                continue
            try:
                features = sorted(
                    {progs[p] for t in types for p in bpfsys.prog_query(fd, t) if p in progs}
                )
                path = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            if features:
                out.append(
                    {
                        "id": cgroup_id,
                        "path": path,
                        "container": records.get(cgroup_id),
                        "features": features,
                    }
                )
    return out


def counters() -> dict[str, Any]:
    """What the metrics export from the maps, each map walked once (not once per cgroup):
    {"denials": {cgroup id: {"c 1:5 r": n}}, "net": {cgroup id: [egress bytes, egress
    packets, ingress bytes, ingress packets] (None where not counted)}, "maps": [{feature,
    version, map, entries, max_entries}]}. Lists, not dicts, per cgroup: 10,000 cgroups."""
    from .. import bpfsys
    from ..bpfsys import MapType
    from ..devices import encode as dev_enc
    from ..layers import STORAGE_KEY
    from ..net import layout as net_lay

    slot = {int(net_lay.EGRESS): 0, int(net_lay.INGRESS): 2}
    denials: dict[int, dict[str, int]] = {}
    net: dict[int, list[int | None]] = {}
    fill = []
    _progs, sets = _our_programs()
    try:
        for layer, maps in _unique_sets(sets):
            for spec in layer.maps:
                fd = maps.get(spec.name)
                if fd is None:
                    continue
                info = bpfsys.map_info(fd)
                if spec.type == MapType.HASH:
                    walk = layer.feature == "devices" and spec.name == "dev_denials"
                    keys = bpfsys.map_keys(fd, spec.key_size) if walk else []
                    fill.append(
                        {
                            "feature": layer.feature,
                            "version": layer.version,
                            "map": spec.name,
                            "id": info.id,
                            "entries": len(keys) if walk else bpfsys.map_count(fd, spec.key_size),
                            "max_entries": info.max_entries,
                        }
                    )
                    if walk:
                        _walk_denials(fd, keys, layer.version, denials, dev_enc)
                if layer.feature == "net" and spec.name == "net_acct":
                    for key in bpfsys.map_keys(fd, spec.key_size):
                        cgroup_id, at = STORAGE_KEY.unpack(key)
                        i = slot.get(at)
                        if i is None:
                            continue
                        vals = bpfsys.map_lookup_percpu(fd, key, net_lay.ACCT.size) or []
                        pairs = [net_lay.ACCT.unpack(v) for v in vals]
                        row = net.setdefault(cgroup_id, [None] * 4)
                        row[i] = (row[i] or 0) + sum(b for b, _ in pairs)
                        row[i + 1] = (row[i + 1] or 0) + sum(n for _, n in pairs)
    finally:
        _close_sets(sets)
    return {"denials": denials, "net": net, "maps": fill}


def _walk_denials(
    fd: int, keys: list[bytes], version: int, out: dict[int, dict[str, int]], enc: Any
) -> None:
    from .. import bpfsys
    from ..devices import layout as dev_lay

    if version != dev_lay.VERSION:
        return  # an older layout's counters: `inspect` shows them, metrics do not
    by_cg: dict[int, list[tuple[bytes, bytes]]] = {}
    for key in keys:
        val = bpfsys.map_lookup(fd, key, enc.DENY_VAL.size)
        if val is not None:
            by_cg.setdefault(enc.DENY_KEY.unpack(key)[0], []).append((key, val))
    for cgroup_id, items in by_cg.items():
        d = out.setdefault(cgroup_id, {})
        for label, n in enc.merge_denials(enc.decode_denials(items, cgroup_id)).items():
            d[label] = max(d.get(label, 0), n)
