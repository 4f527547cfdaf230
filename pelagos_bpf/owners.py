"""Who owns a setting on a cgroup: the roles that write device rules and net settings.

Why owners: a container's cgroup is shared by several writers that trust each other unequally.
The runtime (a library caller, the CLI) sets the container's enforcement; the OCI hook and the
NRI plugin act on input from pod authors (annotations). Each role owns its device rule set
(AND-ed with the others' by the kernel: it can only tighten) and can never replace, detach or
roll back another role's; a cgroup's net settings have one owner, and a second role asking for
them is refused, never allowed to overwrite. The resident agent acts for whichever role sent
the request. See docs/DEVICES.md, "Owners".
"""

from __future__ import annotations

from typing import Literal

Owner = Literal["runtime", "hook", "nri"]
OWNERS: tuple[Owner, ...] = ("runtime", "hook", "nri")
RUNTIME: Owner = "runtime"
HOOK: Owner = "hook"
NRI: Owner = "nri"
# The number each owner has in BPF map keys and cgroup storage (0: none / an older release).
OWNER_IDS: dict[Owner, int] = {"runtime": 1, "hook": 2, "nri": 3}
OWNER_NAMES: dict[int, Owner] = {v: k for k, v in OWNER_IDS.items()}


def check_owner(owner: object) -> Owner:
    """The owner, or ValueError naming the accepted ones (requests arrive from outside)."""
    if owner not in OWNERS:
        raise ValueError(f"owner {owner!r} is not one of {', '.join(OWNERS)}")
    return owner
