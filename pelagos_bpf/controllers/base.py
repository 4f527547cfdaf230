"""The unit of work a controller module plans: one write of one value to one cgroupfs file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Write:
    """Write `value` to `<cgroup>/<filename>`; `fallback` (filename, value) is used instead when
    `filename` does not exist in the new cgroup (checked at apply time, e.g. io.bfq.weight)."""

    setting: str
    controller: str
    filename: str
    value: str
    fallback: tuple[str, str] | None = None

    def files(self) -> list[tuple[str, str]]:
        """Candidate (filename, value) pairs, preferred first."""
        return [(self.filename, self.value), *([self.fallback] if self.fallback else [])]


@dataclass(frozen=True)
class Unsupported:
    """A valid setting that cgroup v2 has no file for."""

    setting: str
    reason: str
