"""bpfabi's hand-written `union bpf_attr` layouts agree with the system's <linux/bpf.h>.

The system C compiler prints offsetof/sizeof for every field bpfabi declares, every command and
enum number it uses, and __NR_bpf; a wrong offset would hand the kernel garbage, so each one is
compared. Skipped where there is no cc or no linux-libc-dev header.
"""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pelagos_bpf import bpfabi

ATTRS = bpfabi.Attr.__subclasses__()
HEADER = Path("/usr/include/linux/bpf.h")

# (ctypes class, C type holding the fields, prefix of each field's C name inside that type)
INFO_STRUCTS = (
    (bpfabi.ProgInfoStruct, "struct bpf_prog_info"),
    (bpfabi.MapInfoStruct, "struct bpf_map_info"),
)
ENUMS = (
    (bpfabi.ProgType, "BPF_PROG_TYPE_"),
    (bpfabi.AttachType, "BPF_"),
    (bpfabi.MapType, "BPF_MAP_TYPE_"),
)
FLAGS = ("BPF_ANY", "BPF_NOEXIST", "BPF_EXIST", "BPF_F_ALLOW_OVERRIDE", "BPF_F_ALLOW_MULTI")
FLAGS += ("BPF_F_REPLACE", "BPF_F_QUERY_EFFECTIVE")


def own_fields(cls: type[ct.Structure]) -> list[str]:
    """The fields bpfabi declares (not the zero tail that pads an attr to ATTR_SIZE)."""
    return [name for name, *_ in cls._fields_ if name != "_tail"]


def expected_values() -> dict[str, int]:
    """What bpfabi says, keyed by the C expression the compiler evaluates."""
    out: dict[str, int] = {"sizeof(union bpf_attr) <= ATTR_SIZE": 1}
    for cls in ATTRS:
        for f in own_fields(cls):
            c = f"{cls.c_prefix}{f}"
            out[f"offsetof(union bpf_attr, {c})"] = getattr(cls, f).offset
            out[f"sizeof(((union bpf_attr *)0)->{c})"] = getattr(cls, f).size
    for cls, ctype in INFO_STRUCTS:
        for f in own_fields(cls):
            out[f"offsetof({ctype}, {f})"] = getattr(cls, f).offset
            out[f"sizeof((({ctype} *)0)->{f})"] = getattr(cls, f).size
    for enum, prefix in ENUMS:
        out.update({f"{prefix}{m.name}": int(m) for m in enum})
    out.update(bpfabi.CMDS)
    out.update({f: getattr(bpfabi, f) for f in FLAGS})
    out["SYS_bpf"] = bpfabi.SYS_BPF[os.uname().machine]
    return out


def compiled_values(tmp: Path, exprs: list[str]) -> dict[str, int]:
    lines = [f'  printf("%lld\\n", (long long)({e}));' for e in exprs]
    src = tmp / "layout.c"
    body = "\n".join(lines)
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <sys/syscall.h>\n"
        f"#include <linux/bpf.h>\n#define ATTR_SIZE {bpfabi.ATTR_SIZE}\n"
        f"int main(void) {{\n{body}\n  return 0;\n}}\n"
    )
    exe = tmp / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(exprs, map(int, out), strict=True))


@pytest.mark.skipif(shutil.which("cc") is None or not HEADER.exists(), reason="no cc or bpf.h")
def test_attr_layouts_commands_and_syscall_number_match_the_header(tmp_path: Path) -> None:
    want = expected_values()
    got = compiled_values(tmp_path, list(want))
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert len(ATTRS) == 9  # every command layout bpfsys defines is among the checks


def test_every_attr_is_the_full_zero_filled_size() -> None:
    for cls in ATTRS:
        attr = cls()
        assert ct.sizeof(attr) == bpfabi.ATTR_SIZE, cls.__name__
        assert ct.string_at(ct.addressof(attr), bpfabi.ATTR_SIZE) == bytes(bpfabi.ATTR_SIZE)
