"""progcache: cache files are validated completely, sources are package data, installs work."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pelagos_bpf import progcache, trust
from pelagos_bpf.bpfsys import ProgType
from pelagos_bpf.errors import BpfError

ROOT = Path(__file__).resolve().parent.parent
DEV = ("device", "pelagos_dev", int(ProgType.CGROUP_DEVICE))
NET_IN = ("net", "pelagos_net_in", int(ProgType.CGROUP_SKB))


def _real(prog: tuple[str, str, int]) -> dict[str, object]:
    """The honest cache file of a program, as JSON (compiled first if the cache lacks it)."""
    source, func, ptype = prog
    return progcache._to_json(progcache.get_program(progcache.bpf_source(source), func, ptype))


@pytest.fixture(scope="module")
def dev_json() -> dict[str, object]:
    return _real(DEV)


@pytest.fixture(scope="module")
def net_json() -> dict[str, object]:
    return _real(NET_IN)


def _same_code(a: dict[str, object], b: dict[str, object]) -> bool:
    """Equal up to the map fds bcc happened to use at compile time."""
    tag = [trust.prog_tag(bytes.fromhex(str(d["insns"]))) for d in (a, b)]
    return tag[0] == tag[1] and a["relocs"] == b["relocs"] and a["func"] == b["func"]


def _parse(d: object, func: str = DEV[1], ptype: int = DEV[2]) -> progcache.CompiledProgram:
    return progcache.parse_cached(json.dumps(d).encode(), func, ptype)


def test_honest_file_parses_to_the_same_program(dev_json: dict[str, object]) -> None:
    prog = _parse(dev_json)
    assert progcache._to_json(prog) == dev_json
    assert prog.relocs and all(i in progcache.map_load_indexes(prog.insns) for i, _ in prog.relocs)


def _mutations(d: dict[str, object]) -> dict[str, object]:
    insns = str(d["insns"])
    relocs = d["relocs"]
    assert isinstance(relocs, list) and relocs
    first = relocs[0]
    return {
        "format is a bool": {**d, "format": True},
        "other format": {**d, "format": 99},
        "other func": {**d, "func": "pelagos_net_in"},
        "other prog_type": {**d, "prog_type": int(ProgType.CGROUP_SKB)},
        "prog_type as str": {**d, "prog_type": str(d["prog_type"])},
        "odd-length hex": {**d, "insns": insns[:-1]},
        "not hex": {**d, "insns": "zz" + insns[2:]},
        "upper-case hex": {**d, "insns": insns.upper()},
        "hex with spaces": {**d, "insns": insns[:2] + " " + insns[2:]},
        "partial instruction": {**d, "insns": insns[:-2]},
        "no instructions": {**d, "insns": "", "relocs": []},
        "insns a list": {**d, "insns": [insns]},
        "reloc outside": {**d, "relocs": [[10**6, "dev_rules"], *relocs[1:]]},
        "reloc negative": {**d, "relocs": [[-1, "dev_rules"], *relocs[1:]]},
        "reloc on another insn": {**d, "relocs": [[first[0] + 2, first[1]], *relocs[1:]]},
        "reloc missing": {**d, "relocs": relocs[1:]},
        "reloc duplicated": {**d, "relocs": [first, *relocs]},
        "reloc wrong shape": {**d, "relocs": [[first[0]], *relocs[1:]]},
        "reloc index a float": {**d, "relocs": [[float(first[0]), first[1]], *relocs[1:]]},
        "reloc name an int": {**d, "relocs": [[first[0], 3], *relocs[1:]]},
        "relocs a dict": {**d, "relocs": {"0": "dev_rules"}},
        "no source_hash": {k: v for k, v in d.items() if k != "source_hash"},
        "a list": [d],
        "null": None,
    }


def test_malformed_files_are_a_value_error(dev_json: dict[str, object]) -> None:
    for why, bad in _mutations(copy.deepcopy(dev_json)).items():
        with pytest.raises(ValueError):
            _parse(bad)
            pytest.fail(why)
    for raw in (b"", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"format": 1}'):
        with pytest.raises(ValueError):
            progcache.parse_cached(raw, DEV[1], DEV[2])


IN_GUEST = bool(os.environ.get("PELAGOS_VM_KERNEL"))  # QEMU/TCG guests: ~50x slower
# Pure tests: the guests run a token number of examples.
EXAMPLES = 10 if IN_GUEST else 100
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_value_error(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        progcache.parse_cached(raw, DEV[1], DEV[2])


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@pytest.mark.skipif(
    IN_GUEST,
    reason="pure parsing, run on the host (hypothesis' recursive "
    "strategies took 275 s for 10 examples under TCG)",
)
@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "format": _JSON | st.just(1),
            "func": _JSON | st.just(DEV[1]),
            "prog_type": _JSON | st.just(DEV[2]),
            "insns": _JSON | st.sampled_from(["", "18", "b700000001000000", "1811"]),
            "relocs": _JSON | st.just([[0, "m"]]),
            "source_hash": _JSON,
        },
    )
)
def test_any_json_object_parses_or_raises_value_error(d: dict[str, object]) -> None:
    with contextlib.suppress(ValueError):
        _parse(d)


# ---------------------------------------------------------------- through get_program


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, root-owned cache dir under /tmp, named by $PELAGOS_BPF_CACHE."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = Path(f"/tmp/pelagos-cache-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o755)
    monkeypatch.setenv(progcache.CACHE_ENV, str(d))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _file(prog: tuple[str, str, int]) -> str:
    source, func, ptype = prog
    return progcache.cache_file_name(progcache.bpf_source(source), func, ptype)


def _get(prog: tuple[str, str, int], compile_if_missing: bool) -> progcache.CompiledProgram:
    source, func, ptype = prog
    src = progcache.bpf_source(source)
    return progcache.get_program(src, func, ptype, compile_if_missing=compile_if_missing)


@pytest.mark.root
def test_cache_miss_names_the_file_and_the_fix(cache: Path) -> None:
    with pytest.raises(BpfError) as ei:
        _get(DEV, False)
    assert ei.value.errno == errno.ENOENT
    msg = str(ei.value)
    assert f"{cache}/{_file(DEV)} missing" in msg and "pelagos-bpf compile" in msg


@pytest.mark.root
def test_file_for_another_program_is_unusable(cache: Path, net_json: dict) -> None:
    """A file claiming another function/type under our name: never loaded as ours."""
    (cache / _file(DEV)).write_text(json.dumps(net_json))
    with pytest.raises(BpfError) as ei:
        _get(DEV, False)
    assert f"{cache}/{_file(DEV)} unusable" in str(ei.value)
    assert "describes pelagos_net_in" in str(ei.value)


@pytest.mark.root
def test_malformed_file_is_recompiled_when_allowed(cache: Path, dev_json: dict) -> None:
    if IN_GUEST:
        pytest.skip("guests never run bcc/LLVM under TCG (pre-filled cache); not kernel-bound")
    bad = {**dev_json, "relocs": [[10**6, "dev_rules"]]}
    (cache / _file(DEV)).write_text(json.dumps(bad))
    with pytest.raises(BpfError, match="unusable"):
        _get(DEV, False)
    prog = _get(DEV, True)  # bcc compiles afresh and replaces the file
    assert _same_code(progcache._to_json(prog), dev_json)
    assert json.loads((cache / _file(DEV)).read_text()) == progcache._to_json(prog)
    assert stat.S_IMODE((cache / _file(DEV)).stat().st_mode) == 0o644


@pytest.mark.root
def test_untrusted_cache_dir_is_never_read_or_compiled_into(cache: Path, dev_json: dict) -> None:
    (cache / _file(DEV)).write_text(json.dumps(dev_json))
    os.chmod(cache, 0o777)
    for allowed in (False, True):
        with pytest.raises(BpfError) as ei:
            _get(DEV, allowed)
        assert f"untrusted cache dir {cache}: mode 0777" in str(ei.value)
    assert os.listdir(cache) == [_file(DEV)]


# ---------------------------------------------------------------- sources and installs


def test_sources_are_package_data() -> None:
    d = progcache.project_bpf_dir()
    assert d == Path(progcache.__file__).parent / progcache.SOURCES
    assert (d / "device.c").read_bytes() == (ROOT / "bpf" / "device.c").read_bytes()
    assert sorted(p.name for p in (d / "include").rglob("*.h")) == sorted(
        p.name for p in (ROOT / "bpf" / "include").rglob("*.h")
    )


def test_stub_header_list_is_the_tree() -> None:
    """The cache key hashes STUB_HEADERS (a fixed list, no walk on the hot path): a header
    added to bpf/include but not to the list would change programs without changing keys."""
    inc = ROOT / "bpf" / "include"
    on_disk = sorted(str(p.relative_to(inc)) for p in inc.rglob("*") if p.is_file())
    assert on_disk == sorted(progcache.STUB_HEADERS)


def test_kernel_arch_names() -> None:
    cases = {
        "x86_64": "x86",
        "i686": "x86",
        "aarch64": "arm64",
        "armv7l": "arm",
        "ppc64le": "powerpc",
        "s390x": "s390",
        "riscv64": "riscv",
        "loongarch64": "loongarch",
    }
    assert {m: progcache._kernel_arch(m) for m in cases} == cases


def test_uapi_asm_dir_is_this_machines() -> None:
    d = progcache._uapi_asm_dir()
    assert (d / "types.h").is_file() and (d / "bitsperlong.h").is_file()


@pytest.mark.root
def test_pip_install_target_compiles(tmp_path: Path) -> None:
    """`pip install --target DIR .` of a fresh copy of the tree gives a package whose
    `compile` finds its sources as package data (the checkout is nowhere on the path)."""
    if IN_GUEST:
        pytest.skip("QEMU guests have no package registry (pip's build deps); not kernel-bound")
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "bpf", "pelagos_bpf"):
        src = ROOT / name
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(src, tree / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy(src, tree / name)
    target, cdir = tmp_path / "target", tmp_path / "cache"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    r = subprocess.run([*pip, str(tree)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (target / "pelagos_bpf" / progcache.SOURCES).is_symlink()
    env = dict(os.environ, PYTHONPATH=str(target), PELAGOS_BPF_CACHE=str(cdir))
    where = "import pelagos_bpf.progcache as p; print(p.bpf_source('device'))"
    r = subprocess.run(
        [sys.executable, "-c", where], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert r.stdout.strip() == str(target / "pelagos_bpf" / progcache.SOURCES / "device.c")
    r = subprocess.run(
        [sys.executable, "-m", "pelagos_bpf.cli", "compile"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # device, net egress/ingress/sock_create/setsockopt, the mark classifier
    assert r.stdout.count("compiled ") == 6, r.stdout
    assert (cdir / _file(DEV)).is_file()
    assert _same_code(json.loads((cdir / _file(DEV)).read_text()), _real(DEV))


# ---------------------------------------------------------------- the key index (keys.json)


@pytest.fixture
def fresh_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private cache dir and a copy of the device source; per-process key memos cleared."""
    cdir = tmp_path / "cache"
    cdir.mkdir(mode=0o755)
    os.chmod(cdir, 0o755)
    monkeypatch.setenv(progcache.CACHE_ENV, str(cdir))
    src = tmp_path / "device.c"
    shutil.copy(ROOT / "bpf" / "device.c", src)

    _forget()
    yield src
    _forget()


def _forget() -> None:
    """What a fresh process starts with: no key memo, no index read yet."""
    progcache.reset_process_state()


def _index_file() -> Path:
    """The key index file of the one slot a test used (one file per slot)."""
    (f,) = Path(os.environ[progcache.CACHE_ENV]).glob(f"{progcache._KeyIndex.PREFIX}*.json")
    return f


def _no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object) -> str:
        raise AssertionError("hashed the sources although the index knew the key")

    monkeypatch.setattr(progcache, "hash_key", refuse)


def test_key_index_spares_a_fresh_process_the_hash(
    fresh_keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = progcache.cache_key(fresh_keys, DEV[1], DEV[2])
    index = _index_file()
    assert index.is_file() and stat.S_IMODE(index.stat().st_mode) == 0o644
    _forget()
    real_hash = progcache.hash_key
    _no_hashing(monkeypatch)
    assert progcache.cache_key(fresh_keys, DEV[1], DEV[2]) == key
    # The same inputs hashed for real give the same key (the index holds no made-up keys).
    monkeypatch.setattr(progcache, "hash_key", real_hash)
    _forget()
    index.unlink()
    assert progcache.cache_key(fresh_keys, DEV[1], DEV[2]) == key


def test_key_index_entry_is_ignored_when_the_source_changes(fresh_keys: Path) -> None:
    key = progcache.cache_key(fresh_keys, DEV[1], DEV[2])
    fresh_keys.write_text(fresh_keys.read_text() + "\n/* changed */\n")
    _forget()
    assert progcache.cache_key(fresh_keys, DEV[1], DEV[2]) != key


def test_untrusted_key_index_is_not_used(fresh_keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    progcache.cache_key(fresh_keys, DEV[1], DEV[2])
    index = _index_file()
    doc = json.loads(index.read_text())
    doc["key"] = "0" * 32  # a forged key, in a file anyone may write
    index.write_text(json.dumps(doc))
    os.chmod(index, 0o666)
    _forget()
    assert progcache.cache_key(fresh_keys, DEV[1], DEV[2]) != "0" * 32


def test_index_entry_of_another_slot_is_ignored(fresh_keys: Path) -> None:
    """The file name holds a crc of the slot: an entry naming another slot (a collision, or a
    copied file) is a miss, never another program's key."""
    key = progcache.cache_key(fresh_keys, DEV[1], DEV[2])
    index = _index_file()
    doc = json.loads(index.read_text())
    doc["slot"] = "/elsewhere/device.c|pelagos_dev|15"
    doc["key"] = "1" * 32
    index.write_text(json.dumps(doc))
    _forget()
    assert progcache.cache_key(fresh_keys, DEV[1], DEV[2]) == key


def test_ident_is_the_bytecodes_and_spares_the_cache_file(
    fresh_keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """program_ident records digest and tags of the cached bytecode in the index; a fresh
    process then gets them without reading (or compiling) the cache file."""
    import hashlib

    ident = progcache.program_ident(fresh_keys, DEV[1], DEV[2])
    insns = progcache.get_program(fresh_keys, DEV[1], DEV[2]).insns
    assert ident.digest == hashlib.sha256(insns).hexdigest()
    assert ident.tags == trust.prog_tags(insns)
    assert ident.key == progcache.cache_key(fresh_keys, DEV[1], DEV[2])
    _forget()

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("read the cache file although the index knew the ident")

    monkeypatch.setattr(progcache, "_get_cached", refuse)
    _no_hashing(monkeypatch)
    assert progcache.program_ident(fresh_keys, DEV[1], DEV[2]) == ident


@pytest.mark.parametrize(
    "field, value",
    [("tags", ["zz" * 8]), ("tags", []), ("tags", "00" * 8), ("digest", "00"), ("digest", 7)],
)
def test_malformed_ident_is_recomputed(fresh_keys: Path, field: str, value: object) -> None:
    ident = progcache.program_ident(fresh_keys, DEV[1], DEV[2])
    index = _index_file()
    doc = json.loads(index.read_text())
    doc[field] = value
    index.write_text(json.dumps(doc))
    _forget()
    assert progcache.program_ident(fresh_keys, DEV[1], DEV[2]) == ident
    assert json.loads(index.read_text())[field] != value  # and written back whole


# ---------------------------------------------------------------- pruning (pelagos-bpf gc)


def test_prune_removes_only_what_can_never_be_used(fresh_keys: Path) -> None:
    """Temporary files of killed writers (old ones only) and key index files of slots whose
    source is gone go; the index of a live slot, a young temporary file (a write in flight),
    cache files and anything else stay."""
    progcache.program_ident(fresh_keys, "pelagos_dev", 15)  # a live slot's index file
    cdir = Path(os.environ[progcache.CACHE_ENV])
    live_index = _index_file()
    gone_src = fresh_keys.parent / "removed-checkout" / "device.c"
    gone = cdir / f"{progcache._KeyIndex.PREFIX}pelagos_dev-15-00000000.json"
    gone.write_text(json.dumps({"format": progcache._FORMAT, "slot": f"{gone_src}|pelagos_dev|15"}))
    old_tmp = cdir / f"{trust.TMP_PREFIX}{gone.name}-1-abcd"
    young_tmp = cdir / f"{trust.TMP_PREFIX}{gone.name}-2-abcd"
    for f in (old_tmp, young_tmp):
        f.write_text("{")
    now = time.time()
    os.utime(old_tmp, (now - progcache.TMP_MAX_AGE - 1,) * 2)
    malformed = cdir / f"{progcache._KeyIndex.PREFIX}pelagos_dev-15-11111111.json"
    malformed.write_text("not json")
    other = cdir / "device-pelagos_dev-0123.json"
    other.write_text("{}")

    removed = progcache.prune_cache(now)

    assert sorted(removed) == sorted([gone.name, old_tmp.name])
    for kept in (live_index, young_tmp, malformed, other):
        assert kept.exists(), kept
    assert progcache.prune_cache(now) == []  # nothing left to remove
