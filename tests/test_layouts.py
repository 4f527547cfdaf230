"""The C structs in bpf/*.c match the one Python declaration of every map layout."""

from __future__ import annotations

import re
import socket

import pytest

from pelagos_bpf.bpfabi import MapType, ProgType
from pelagos_bpf.compiler import source_path
from pelagos_bpf.devices import layout as dev
from pelagos_bpf.layers import Layer, Layout, ProgSpec
from pelagos_bpf.net import layout as net
from pelagos_bpf.net import plan

C_CODES = {"u64": "Q", "u32": "I", "u16": "H", "s64": "q", "s32": "i"}
STORAGE_KEY_SIZE = 16  # struct bpf_cgroup_storage_key


def c_structs(source: str) -> dict[str, list[tuple[str, str]] | list[str]]:
    """struct name -> [(field, struct code)], or for a struct wrapping a union the member
    struct names."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", source_path(source).read_text(), flags=re.S)
    out: dict[str, list[tuple[str, str]] | list[str]] = {}
    for name, body in re.findall(r"struct (\w+) \{(.*?)\};", text, flags=re.S):
        if "union" in body:
            out[name] = re.findall(r"struct (\w+) \w+;", body)
            continue
        fields = []
        for ctype, fname, n in re.findall(r"(\w+)\s+(\w+)(?:\[(\d+)\])?;", body):
            fields.append((fname, f"{n}{C_CODES[ctype]}" if n else C_CODES[ctype]))
        out[name] = fields
    return out


def c_size(structs: dict, name: str) -> int:
    if name in C_CODES:
        return Layout(name, (("v", C_CODES[name]),)).size
    body = structs[name]
    if body and isinstance(body[0], str):  # a union of structs
        return max(c_size(structs, m) for m in body)
    return Layout(name, tuple(body)).size


DEV_LAYOUTS = (dev.CUR, dev.AUDIT, dev.KEY, dev.RULE, dev.INDEX, dev.DENY_KEY)
LAYOUTS = [("device", lay) for lay in DEV_LAYOUTS] + [
    ("net", lay) for lay in (net.CFG, net.ACCT, net.PRIO_KEY)
]


@pytest.mark.parametrize(("source", "layout"), LAYOUTS, ids=lambda x: getattr(x, "c_name", x))
def test_c_struct_matches_declaration(source: str, layout: Layout) -> None:
    assert c_structs(source)[layout.c_name] == list(layout.fields)


@pytest.mark.parametrize("layer", [dev.LAYER, net.LAYER], ids=lambda lay: lay.feature)
def test_map_sizes_match_the_c_declarations(layer: Layer) -> None:
    structs = c_structs(layer.source)
    text = source_path(layer.source).read_text()
    for spec in layer.maps:
        if spec.type in (MapType.CGROUP_STORAGE, MapType.PERCPU_CGROUP_STORAGE):
            (val,) = re.findall(rf"BPF_\w*CGROUP_STORAGE\({spec.name}, (?:struct )?(\w+)\);", text)
            assert (spec.key_size, spec.value_size) == (STORAGE_KEY_SIZE, c_size(structs, val))
        else:
            (decl,) = re.findall(rf"BPF_HASH\({spec.name}, ([^)]*)\);", text)
            args = [a.strip().removeprefix("struct ") for a in decl.split(",")]
            assert len(args) == 2, f"{spec.name}: sizes live in Python, not in the C declaration"
            assert (spec.key_size, spec.value_size) == tuple(c_size(structs, a) for a in args)


def test_dev_val_is_a_named_union_of_rule_and_index_entries() -> None:
    assert c_structs("device")["dev_val"] == ["dev_rule", "dev_index"]
    assert dev.VAL_SIZE == dev.INDEX.size == 128


def test_each_owner_program_reads_its_own_slot() -> None:
    """pelagos_dev_XX passes its owner's id (owners.OWNER_IDS) to check(), which reads
    dev_cur.gen[owner] and keys its rules and denials by it."""
    from pelagos_bpf.owners import OWNER_IDS

    text = source_path("device").read_text()
    for owner, func in dev.FUNCS.items():
        (body,) = re.findall(rf"^int {func}\(.*?^}}", text, flags=re.M | re.S)
        assert re.search(rf"return check\(ctx, cur, audit, {OWNER_IDS[owner]}\);", body), func


CTX_OF = {  # the context struct the kernel passes each program type
    ProgType.CGROUP_SKB: "__sk_buff",
    ProgType.SCHED_CLS: "__sk_buff",
    ProgType.CGROUP_SOCK: "bpf_sock",
    ProgType.CGROUP_SOCKOPT: "bpf_sockopt",
    ProgType.CGROUP_DEVICE: "bpf_cgroup_dev_ctx",
}


@pytest.mark.parametrize(
    "spec", [*dev.LAYER.progs, *net.LAYER.progs, net.MARK_CLS], ids=lambda s: s.func
)
def test_every_declared_program_has_a_c_function_of_its_type(spec: ProgSpec) -> None:
    source = "device" if spec in dev.LAYER.progs else "net"
    text = source_path(source).read_text()
    (ctx,) = re.findall(rf"^int {spec.func}\(struct (\w+) \*\w+\)", text, flags=re.M)
    assert ctx == CTX_OF[spec.prog_type]
    if spec.attach_type is not None:  # found again by kernel name, which keeps 15 bytes
        assert len(spec.name) <= 15


def test_net_flag_bits_and_socket_constants_match() -> None:
    text = source_path("net").read_text()
    defines = {k: int(v) for k, v in re.findall(r"#define (\w+) (\d+)", text)}
    assert (defines["NET_F_MARK"], defines["NET_F_PRIOS"], defines["NET_F_SOCKET"]) == (
        plan.F_MARK,
        plan.F_PRIOS,
        plan.F_SOCKET,
    )
    assert (defines["SOL_SOCKET"], defines["SO_PRIORITY"]) == (
        socket.SOL_SOCKET,
        socket.SO_PRIORITY,
    )
