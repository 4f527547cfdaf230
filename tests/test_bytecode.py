"""Bytecode files: shipped with the package, current with the sources, validated completely,
read only from trusted directories; the compiler's own helpers."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pelagos_bpf import bytecode, compiler, trust
from pelagos_bpf.bpfabi import ProgType
from pelagos_bpf.errors import BpfError
from pelagos_bpf.registry import all_programs

ROOT = Path(__file__).resolve().parent.parent
DEV = ("device", "pelagos_dev_rt", int(ProgType.CGROUP_DEVICE))
NET_IN = ("net", "pelagos_net_in", int(ProgType.CGROUP_SKB))
IN_GUEST = bool(os.environ.get("PELAGOS_VM_KERNEL"))  # QEMU/TCG guests: ~50x slower
EXAMPLES = 10 if IN_GUEST else 100
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _json(prog: tuple[str, str, int]) -> dict[str, object]:
    """The shipped file of a program, as JSON."""
    return json.loads((Path(bytecode.PACKAGED_DIR) / bytecode.file_name(*prog[:2])).read_text())


@pytest.fixture(scope="module")
def dev_json() -> dict[str, object]:
    return _json(DEV)


def _parse(d: object, prog: tuple[str, str, int] = DEV) -> bytecode.CompiledProgram:
    return bytecode.parse(json.dumps(d).encode(), *prog)


# ---------------------------------------------------------------- what the package ships


@pytest.mark.parametrize("prog", all_programs(), ids=lambda p: f"{p[0]}.{p[1]}")
def test_shipped_bytecode_is_current(prog: tuple[str, str, int]) -> None:
    """Every program the features load has a bytecode file compiled from today's sources and
    stub headers: an edit to bpf/ without `pelagos-bpf compile` fails here, not in a kernel."""
    source, func, ptype = prog
    got = bytecode.get_program(source, func, ptype)
    assert got.inputs_hash == compiler.inputs_hash(source), (
        f"{bytecode.file_name(source, func)} is stale: run `pelagos-bpf compile`"
    )
    assert compiler.is_current(bytecode.PACKAGED_DIR, source, func, ptype)


def test_honest_file_parses_to_the_same_program(dev_json: dict[str, object]) -> None:
    prog = _parse(dev_json)
    assert json.loads(bytecode.to_json(prog)) == dev_json
    assert prog.relocs and all(i in bytecode.map_load_indexes(prog.insns) for i, _ in prog.relocs)


def _mutations(d: dict[str, object]) -> dict[str, object]:
    insns = str(d["insns"])
    relocs = d["relocs"]
    assert isinstance(relocs, list) and relocs
    first = relocs[0]
    return {
        "format is a bool": {**d, "format": True},
        "other format": {**d, "format": 99},
        "other source": {**d, "source": "net"},
        "other func": {**d, "func": "pelagos_net_in"},
        "other prog_type": {**d, "prog_type": int(ProgType.CGROUP_SKB)},
        "prog_type as str": {**d, "prog_type": str(d["prog_type"])},
        "other machine": {**d, "machine": "sparc64"},
        "inputs_hash not hex": {**d, "inputs_hash": "x" * 64},
        "no inputs_hash": {k: v for k, v in d.items() if k != "inputs_hash"},
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
        "a list": [d],
        "null": None,
    }


def test_malformed_files_are_a_value_error(dev_json: dict[str, object]) -> None:
    for why, bad in _mutations(copy.deepcopy(dev_json)).items():
        with pytest.raises(ValueError):
            _parse(bad)
            pytest.fail(why)
    for raw in (b"", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"format": 2}'):
        with pytest.raises(ValueError):
            bytecode.parse(raw, *DEV)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_value_error(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        bytecode.parse(raw, *DEV)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@pytest.mark.skipif(
    IN_GUEST, reason="pure parsing: run on the host (recursive strategies are slow under TCG)"
)
@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "format": _JSON | st.just(bytecode.FORMAT),
            "source": _JSON | st.just(DEV[0]),
            "func": _JSON | st.just(DEV[1]),
            "prog_type": _JSON | st.just(DEV[2]),
            "machine": _JSON | st.just(os.uname().machine),
            "inputs_hash": _JSON | st.just("0" * 64),
            "insns": _JSON | st.sampled_from(["", "18", "b700000001000000", "1811"]),
            "relocs": _JSON | st.just([[0, "m"]]),
        },
    )
)
def test_any_json_object_parses_or_raises_value_error(d: dict[str, object]) -> None:
    with contextlib.suppress(ValueError):
        _parse(d)


# ---------------------------------------------------------------- through get_program


@pytest.fixture
def custom(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, root-owned bytecode dir under /tmp, selected by $PELAGOS_BPF_BYTECODE."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    d = Path(f"/tmp/pelagos-bytecode-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o755)
    monkeypatch.setenv(bytecode.BYTECODE_ENV, str(d))
    bytecode.reset_process_state()
    try:
        yield d
    finally:
        bytecode.reset_process_state()
        shutil.rmtree(d, ignore_errors=True)


def _name(prog: tuple[str, str, int]) -> str:
    return bytecode.file_name(prog[0], prog[1])


@pytest.mark.root
def test_missing_file_names_the_file_and_the_fix(custom: Path) -> None:
    with pytest.raises(BpfError) as ei:
        bytecode.get_program(*DEV)
    assert ei.value.errno == errno.ENOENT
    msg = str(ei.value)
    assert f"{custom}/{_name(DEV)} is missing" in msg and "pelagos-bpf compile" in msg


@pytest.mark.root
def test_file_for_another_program_is_refused(custom: Path) -> None:
    """A file claiming another function/type under our name: never loaded as ours."""
    (custom / _name(DEV)).write_text(json.dumps(_json(NET_IN)))
    with pytest.raises(BpfError) as ei:
        bytecode.get_program(*DEV)
    assert f"{custom}/{_name(DEV)} is unusable" in str(ei.value)
    assert "pelagos_net_in" in str(ei.value)


@pytest.mark.root
@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_untrusted_bytecode_dir_is_never_read(custom: Path, dev_json: dict, mode: int) -> None:
    (custom / _name(DEV)).write_text(json.dumps(dev_json))
    os.chmod(custom, mode)
    with pytest.raises(BpfError) as ei:
        bytecode.get_program(*DEV)
    assert f"untrusted bytecode dir {custom}: mode {mode:04o}" in str(ei.value)


@pytest.mark.root
def test_bytecode_file_others_may_write_is_refused(custom: Path, dev_json: dict) -> None:
    f = custom / _name(DEV)
    f.write_text(json.dumps(dev_json))
    os.chmod(f, 0o666)
    with pytest.raises(BpfError, match="group/world-writable"):
        bytecode.get_program(*DEV)
    os.chmod(f, 0o644)
    os.chown(f, 65534, 65534)
    with pytest.raises(BpfError, match="owned by uid 65534"):
        bytecode.get_program(*DEV)


@pytest.mark.root
def test_symlinked_bytecode_file_is_refused(custom: Path) -> None:
    os.symlink(Path(bytecode.PACKAGED_DIR) / _name(DEV), custom / _name(DEV))
    with pytest.raises(BpfError, match="is a symlink"):
        bytecode.get_program(*DEV)


@pytest.mark.root
def test_custom_dir_is_used_when_named(custom: Path) -> None:
    shutil.copy(Path(bytecode.PACKAGED_DIR) / _name(DEV), custom / _name(DEV))
    os.chmod(custom / _name(DEV), 0o644)
    assert (
        bytecode.get_program(*DEV).insns
        == _parse(json.loads((Path(bytecode.PACKAGED_DIR) / _name(DEV)).read_text())).insns
    )


def test_ident_is_the_bytecodes() -> None:
    insns = bytecode.get_program(*DEV).insns
    got = bytecode.ident(*DEV)
    assert got.tags == trust.prog_tags(insns) and len(got.digest) == 64


# ---------------------------------------------------------------- the compiler's helpers


def test_sources_are_package_data() -> None:
    d = compiler.SOURCES_DIR
    assert (d / "device.c").read_bytes() == (ROOT / "bpf" / "device.c").read_bytes()
    assert sorted(p.name for p in (d / "include").rglob("*.h")) == sorted(
        p.name for p in (ROOT / "bpf" / "include").rglob("*.h")
    )


def test_stub_header_list_is_the_tree() -> None:
    """inputs_hash covers STUB_HEADERS: a header added to bpf/include but not to the list would
    change programs without making their bytecode stale."""
    inc = ROOT / "bpf" / "include"
    on_disk = sorted(str(p.relative_to(inc)) for p in inc.rglob("*") if p.is_file())
    assert on_disk == sorted(compiler.STUB_HEADERS)


def test_inputs_hash_moves_with_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "bpfsrc"
    shutil.copytree(compiler.SOURCES_DIR, tree)
    monkeypatch.setattr(compiler, "SOURCES_DIR", tree)
    before = compiler.inputs_hash("device")
    (tree / "device.c").write_text((tree / "device.c").read_text() + "\n// edited\n")
    assert compiler.inputs_hash("device") != before
    (tree / "device.c").write_bytes((ROOT / "bpf" / "device.c").read_bytes())
    assert compiler.inputs_hash("device") == before
    (tree / "include" / "linux" / "types.h").write_text("/* changed */\n")
    assert compiler.inputs_hash("device") != before


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
    assert {m: compiler._kernel_arch(m) for m in cases} == cases


def test_uapi_asm_dir_is_this_machines() -> None:
    d = compiler._uapi_asm_dir()
    assert (d / "types.h").is_file() and (d / "bitsperlong.h").is_file()
