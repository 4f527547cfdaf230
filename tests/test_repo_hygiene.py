"""The repository's hygiene: what git tracks, and what the newcomer's pages say.

Git tracks sources only: a tracked venv or build output makes a fresh clone reuse another
machine's interpreter paths (it happened: 3,192 files of .venv/ were once committed).
README.md stays a landing page and README.md and docs/ carry no run timestamps, no commit hashes
and no broken relative links; docs/ARCHITECTURE.md lists every module of the package."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILT = re.compile(r"(^|/)(\.venv|[^/]+\.egg-info|__pycache__|build|dist|\.pytest_cache)/")


def _tracked() -> list[str]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to check")
    out = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_built_files_tracked() -> None:
    tracked = _tracked()
    assert tracked, "git ls-files listed nothing: the check would prove nothing"
    built = [p for p in tracked if BUILT.search(p) or p.endswith((".pyc", ".so", ".o"))]
    assert built == [], f"built files are tracked (git rm -r --cached them): {built[:10]}"


def test_pattern_catches_what_it_must() -> None:
    for path in (".venv/bin/python", "pelagos_bpf.egg-info/PKG-INFO", "tests/__pycache__/x.pyc"):
        assert BUILT.search(path), path
    for path in ("pelagos_bpf/cgroup.py", "bpf/device.c", "bench/bench_net.py"):
        assert not BUILT.search(path), path


# ---------------------------------------------------------------- the docs a newcomer reads
#
# Why: the README is the landing page (what it is, install, quick starts, links), and README.md
# and docs/ describe the project as it is. Run logs, times of day and commit hashes go stale the
# day they are written; they belong in git history, CHANGELOG.md and the benchmarks' own output.

README = ROOT / "README.md"
README_MAX = 8 * 1024  # bytes: the anchors' READMEs say what, how to install, how to use
DOCS = ROOT / "docs"
ARCHITECTURE = DOCS / "ARCHITECTURE.md"
PACKAGE = ROOT / "pelagos_bpf"

_HH_MM = r"(?:[01]\d|2[0-3]):[0-5]\d"
RUN_TIMESTAMP = re.compile(
    "|".join(
        (
            rf"\b\d{{4}}-\d{{2}}-\d{{2}}[ T,]+{_HH_MM}",  # 2026-11-29 05:59, 2026-11-29T05:59
            rf"\({_HH_MM}\)",  # (12:27)
            rf"\b(?:at|from|until|since|before|after|by)\s+{_HH_MM}\b",  # at 04:16
            rf"\b{_HH_MM}\s*(?:-|\u2013|and|to)\s*{_HH_MM}\b",  # 14:30-14:37, 19:08 and 19:36
            rf"\b{_HH_MM}(?::[0-5]\d)?\s*(?:UTC|GMT|CET|CEST)\b",  # 19:36 UTC
        )
    )
)
HEX_WORD = re.compile(r"(?<![\w.])[0-9a-f]{7,40}(?![\w])")
# Hex words of 7+ characters that are not commits (add one here with the reason).
NOT_COMMITS: frozenset[str] = frozenset()
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def git_objects(words: set[str]) -> set[str]:
    """Those of `words` the checkout's repository knows as objects (commits, tags, trees,
    blobs, abbreviated or whole): one `git cat-file --batch-check` for all of them."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists() or not words:
        return set()
    order = sorted(words)
    out = subprocess.run(
        [git, "-C", str(ROOT), "cat-file", "--batch-check"],
        input="".join(w + "\n" for w in order),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return {w for w, line in zip(order, out, strict=True) if not line.endswith(" missing")}


def commit_like(word: str) -> bool:
    """Hex that reads as an abbreviated or full object name: digits and letters a-f mixed
    (pure digits are numbers; pure letters are words), unless listed in NOT_COMMITS."""
    return (
        word not in NOT_COMMITS
        and any(c.isdigit() for c in word)
        and any(c in "abcdef" for c in word)
    )


def test_readme_is_a_landing_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX, f"README.md is {size} bytes, over {README_MAX}: move detail to docs/"


def test_no_run_timestamps_in_readme_or_docs() -> None:
    found = []
    for p in _doc_files():
        text = p.read_text()  # whole: a wrapped line may split "at" from its time
        for m in RUN_TIMESTAMP.finditer(text):
            n = text.count("\n", 0, m.start()) + 1
            found.append(f"{p.relative_to(ROOT)}:{n}: {' '.join(m.group().split())!r}")
    assert found == [], "times of day of particular runs (state what is measured instead):\n" + (
        "\n".join(found)
    )


def test_no_commit_hashes_in_readme_or_docs() -> None:
    seen = [
        (p, n, m.group())
        for p in _doc_files()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        for m in HEX_WORD.finditer(line)
        if m.group() not in NOT_COMMITS
    ]
    known = git_objects({w for _, _, w in seen})
    found = [f"{p.relative_to(ROOT)}:{n}: {w}" for p, n, w in seen if commit_like(w) or w in known]
    assert found == [], "commit hashes (cite a release or CHANGELOG.md instead):\n" + "\n".join(
        found
    )


def test_relative_links_in_readme_and_docs_resolve() -> None:
    broken = []
    for p in _doc_files():
        for n, line in enumerate(p.read_text().splitlines(), 1):
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # a URL (https:, mailto:) or an anchor in the same file
                path = (p.parent / target.split("#", 1)[0]).resolve()
                if not path.exists():
                    broken.append(f"{p.relative_to(ROOT)}:{n}: {target}")
    assert broken == [], "relative links to files that do not exist:\n" + "\n".join(broken)


def _listed_modules() -> set[str]:
    """Paths in the first column of ARCHITECTURE.md's tables (`agent/server.py`, `_sys.c`)."""
    listed = set()
    for line in ARCHITECTURE.read_text().splitlines():
        if not line.startswith("|"):
            continue
        first = line.split("|")[1]
        listed.update(re.findall(r"`([\w./-]+\.(?:py|pyi|c))`", first))
    return listed


def test_architecture_lists_every_module() -> None:
    """docs/ARCHITECTURE.md names each module of the package with its one job, and no module
    that is gone: the module map is what a contributor reads first."""
    modules = {
        p.relative_to(PACKAGE).as_posix()
        for p in [*PACKAGE.rglob("*.py"), PACKAGE / "_sys.c"]
        if not p.name.endswith("_pb2.py") and "bpfsrc" not in p.parts
    }
    listed = _listed_modules()
    missing = sorted(modules - listed)
    assert missing == [], f"modules missing from docs/ARCHITECTURE.md: {missing}"
    gone = sorted(m for m in listed if not (PACKAGE / m).exists() and not (ROOT / m).exists())
    assert gone == [], f"docs/ARCHITECTURE.md lists files that do not exist: {gone}"


def test_doc_checks_catch_what_they_must() -> None:
    for text in (
        "CI run of 2026-11-29 05:59, 746a334",
        "at 04:16 (682 passed)",
        "one run (12:27)",
        "between 19:08 and 19:36 UTC",
        "Seventh pass (2026-11-29, 14:30-)",
        "runs at 03:45, 06:44",
        "slower that hour than at\n04:16",
    ):
        assert RUN_TIMESTAMP.search(text), text
    for text in (
        "classid 1:10",
        "allow c 10:200 rwm",
        'classids = ["1:20-1:2f"]',
        "--ulimit nofile=1024:1024",
        "allow c 136:* rwm",
        "p99 <= 15 ms",
        "deny c 240:1 w",
    ):
        assert not RUN_TIMESTAMP.search(text), text
    words = [m.group() for m in HEX_WORD.finditer("at 746a334; 0x10010; 1048575; abcdefa")]
    assert words == ["746a334", "1048575", "abcdefa"]
    assert commit_like("746a334") and commit_like("94f638d")
    assert not commit_like("1048575") and not commit_like("abcdefa")
    git = shutil.which("git")
    head = ""
    if git is not None and (ROOT / ".git").exists():
        head = subprocess.run(
            [git, "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    if head:  # a checkout: an abbreviated commit of its own history is found as one
        assert git_objects({head, "ffffff0"}) == {head}
