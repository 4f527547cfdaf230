"""apt for kernel packages: the system's configuration, or a private one per Debian suite.

Why private lists: bullseye's 5.10 and sid's newest kernel live in suites the system's sources
don't name, and a test runner must never change the system's apt configuration. A private
suite is a sources.list + lists + cache directory inside the kernel cache, signed by the
system's archive keyring and pointed at the same archive URI as the system's own sources; every
apt command gets them through `-o Dir::...` options. Its lists are fetched once and refreshed
when older than a day (or when a download fails), with the cost printed.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SYSTEM_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
STALE_SECONDS = 24 * 3600
_TIMEOUT = 600


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`: runners sharing the cache take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class AptError(RuntimeError):
    """An apt command failed; the message names the command and apt's own words."""


def archive_uri(sources: tuple[Path, ...] = SYSTEM_SOURCES) -> str:
    """The system's Debian archive URI (not the security one): private suites use the same."""
    files: list[Path] = []
    for s in sources:
        files += sorted(s.glob("*.sources")) + sorted(s.glob("*.list")) if s.is_dir() else [s]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":  # deb822 stanzas: URIs: ... / Suites: ...
            for stanza in text.split("\n\n"):
                fields = dict(
                    (k.strip(), v.strip())
                    for k, _, v in (ln.partition(":") for ln in stanza.splitlines())
                    if not k.startswith("#") and v
                )
                uri = fields.get("URIs", "").split()
                if uri and "security" not in uri[0] and fields.get("Types", "deb") == "deb":
                    return uri[0].rstrip("/")
        else:  # one-line format: deb [opts] URI suite components
            for ln in text.splitlines():
                words = [w for w in ln.split() if not w.startswith("[") and not w.endswith("]")]
                if len(words) >= 3 and words[0] == "deb" and "security" not in words[1]:
                    return words[1].rstrip("/")
    return DEFAULT_MIRROR


class Apt:
    """apt-get/apt-cache with either the system's configuration (suite None) or a private one."""

    def __init__(self, suite: str | None, root: Path) -> None:
        self.suite = suite
        self.root = root
        self.dir = root / suite if suite else None
        self._updated = False  # at most one update per process and configuration

    def __str__(self) -> str:
        return f"private apt lists for {self.suite}" if self.suite else "the system's apt lists"

    def options(self) -> list[str]:
        if self.dir is None:
            return ["-o", "APT::Sandbox::User=root"]
        d = self.dir
        return [
            "-o", f"Dir::Etc::SourceList={d / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={d / 'lists'}",
            "-o", f"Dir::Cache={d / 'cache'}",
            "-o", "Dir::State::status=/dev/null",  # the host's installed kernel is not a candidate
            "-o", "Acquire::Languages=none",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip

    def _run(self, tool: str, args: list[str], cwd: Path | None = None) -> str:
        argv = [tool, *self.options(), *args]
        try:
            r = subprocess.run(
                argv, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT, check=False
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise AptError(f"{tool} {' '.join(args)} ({self}): {e}") from None
        if r.returncode != 0:
            why = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
            raise AptError(f"{tool} {' '.join(args)} ({self}) failed: {' | '.join(why)}")
        return r.stdout

    def _stamp(self) -> Path | None:
        return self.dir / "updated" if self.dir else None

    def ensure_lists(self, log=print) -> None:
        """A private suite's lists exist and are under a day old (the system's are left alone)."""
        stamp = self._stamp()
        if stamp is None:
            return
        if not stamp.exists():
            self.update(log, why="no lists yet")
        elif time.time() - stamp.stat().st_mtime > STALE_SECONDS:
            try:
                self.update(log, why="lists older than a day")
            except AptError as e:  # offline: stale lists still resolve
                log(f"vm: {e}; keeping the old lists")

    def update(self, log=print, why: str = "") -> bool:
        """Fetch the lists (once per process); False when already done or not allowed."""
        if self._updated or os.geteuid() != 0:
            return False
        self._updated = True
        if self.dir is not None:
            self._write_config()
        t0 = time.monotonic()
        with locked(self.root / f".{self.suite or 'system'}.update.lock"):
            self._run("apt-get", ["update", "-q"])
        if (stamp := self._stamp()) is not None:
            stamp.touch()
        log(f"vm: apt-get update, {self} ({why}): {time.monotonic() - t0:.1f}s")
        return True

    def _write_config(self) -> None:
        assert self.dir is not None
        (self.dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        line = f"deb [signed-by={KEYRING}] {archive_uri()} {self.suite} main\n"
        (self.dir / "sources.list").write_text(line)

    def depends(self, package: str, important: bool = True) -> list[str]:
        """Package names in `package`'s Depends (virtual and alternative ones included)."""
        args = ["depends", *(["--important"] if important else []), package]
        try:
            return parse_depends(self._run("apt-cache", args))
        except AptError:
            return []

    def has(self, package: str) -> bool:
        try:
            out = self._run("apt-cache", ["show", "--no-all-versions", package])
        except AptError:
            return False
        return bool(out.strip())

    def version(self, package: str) -> str | None:
        """The candidate version of `package` (None when no source has it)."""
        try:
            out = self._run("apt-cache", ["show", "--no-all-versions", package])
        except AptError:
            return None
        found = [
            ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version:")
        ]
        return found[0] if found else None

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """The .deb files of `packages`, downloaded into dest, in the order asked."""
        self._run("apt-get", ["download", "-q", *packages], cwd=dest)
        debs = {p.name.split("_", 1)[0]: p for p in dest.glob("*.deb")}
        missing = [p for p in packages if p not in debs]
        if missing:
            raise AptError(f"apt-get download ({self}) produced no .deb for {missing}")
        return [debs[p] for p in packages]


def parse_depends(out: str) -> list[str]:
    """Names on `apt-cache depends` Depends lines ("|Depends: x", "Depends: <virtual>")."""
    names = []
    for line in out.splitlines():
        kind, _, name = line.strip().lstrip("|").partition(":")
        if kind == "Depends" and name.strip():
            names.append(name.strip().strip("<>"))
    return names


def apt_for(package: str, apts: list[Apt], log=print) -> Apt:
    """The first apt configuration that knows `package` (system first, then private suites)."""
    for apt in apts:
        if apt.suite is not None:
            apt.ensure_lists(log)
        if apt.has(package):
            return apt
    where = ", ".join(str(a) for a in apts)
    raise AptError(f"no apt source has {package} (looked in {where})")
