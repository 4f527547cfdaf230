"""The Cgroup handle (SKELETON: setup/teardown land in the foundation issue)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Cgroup:
    """A cgroup created (or opened) by this library.

    `path` is the absolute cgroupfs directory; `id` is the kernel's cgroup id (the directory's
    inode number on cgroup2), which BPF programs and maps use as the key for this cgroup.
    """

    path: Path
    id: int
    root: Path
    created: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Cgroup:
        """A handle for an existing cgroup directory (e.g. in another process than setup's)."""
        p = Path(path)
        return cls(path=p, id=os.stat(p).st_ino, root=Path(root) if root else p.parent)

    def open_fd(self) -> int:
        """An O_RDONLY|O_DIRECTORY fd of the cgroup dir for bpf(2) attach calls; caller closes."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
