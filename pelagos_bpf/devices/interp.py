"""A small eBPF interpreter for cgroup device programs (youki runs its programs in rbpf).

Two uses: the test suite runs our compiled bpf/device.c against Python dict maps, so the
program's logic is checked against the reference evaluator without root or a kernel; and
`devices check` runs a FOREIGN device program (a runtime's own: runc, crun and systemd emit
straight-line ALU code reading the context) on the access asked about, since no kernel supports
BPF_PROG_TEST_RUN for cgroup_device. It implements the ALU, jump, load and store instructions of
the BPF ISA on 64-bit registers and the two helpers our program calls; anything else (another
helper, a map it was not given, a backwards jump loop past the step limit) raises NotEvaluable,
so an answer is only ever given for a program it really ran.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
EEXIST = 17
MAX_STEPS = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS: no verified program runs longer
HELPER_MAP_LOOKUP = 1
HELPER_MAP_UPDATE = 2
HELPER_GET_LOCAL_STORAGE = 81


class NotEvaluable(Exception):
    """The program does something this interpreter does not model (it says what)."""


@dataclass
class Ptr:
    """A pointer into a bytearray (stack, ctx, storage or a map value)."""

    buf: bytearray
    off: int = 0

    def add(self, n: int) -> Ptr:
        return Ptr(self.buf, self.off + n)


@dataclass
class HashMap:
    key_size: int
    value_size: int
    data: dict[bytes, bytearray] = field(default_factory=dict)
    max_entries: int = 1 << 30


@dataclass
class Storage:
    value: bytearray


@dataclass(frozen=True)
class MapRef:
    name: str


Reg = int | Ptr | MapRef


def _signed(v: int, bits: int = 64) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _alu(code: int, a: int, b: int, bits: int) -> int:
    mask = (1 << bits) - 1
    a &= mask
    b &= mask
    shift = b & (bits - 1)
    if code == 0x00:
        r = a + b
    elif code == 0x10:
        r = a - b
    elif code == 0x20:
        r = a * b
    elif code == 0x30:
        r = a // b if b else 0  # the kernel defines x/0 as 0
    elif code == 0x40:
        r = a | b
    elif code == 0x50:
        r = a & b
    elif code == 0x60:
        r = a << shift
    elif code == 0x70:
        r = a >> shift
    elif code == 0x80:
        r = -a
    elif code == 0x90:
        r = a % b if b else a  # and x%0 as x
    elif code == 0xA0:
        r = a ^ b
    elif code == 0xB0:
        r = b
    elif code == 0xC0:
        r = _signed(a, bits) >> shift
    else:
        raise NotEvaluable(f"ALU operation {code:#x}")
    return r & mask


def _cond(code: int, a: int, b: int, bits: int) -> bool:
    mask = (1 << bits) - 1
    a &= mask
    b &= mask
    sa, sb = _signed(a, bits), _signed(b, bits)
    table: dict[int, Callable[[], bool]] = {
        0x10: lambda: a == b,
        0x20: lambda: a > b,
        0x30: lambda: a >= b,
        0x40: lambda: bool(a & b),
        0x50: lambda: a != b,
        0x60: lambda: sa > sb,
        0x70: lambda: sa >= sb,
        0xA0: lambda: a < b,
        0xB0: lambda: a <= b,
        0xC0: lambda: sa < sb,
        0xD0: lambda: sa <= sb,
    }
    if code not in table:
        raise NotEvaluable(f"jump operation {code:#x}")
    return table[code]()


_SIZES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}


class Machine:
    """One program over given maps (map name -> HashMap | Storage); `run(ctx)` returns r0."""

    def __init__(
        self,
        insns: bytes,
        relocs: dict[int, str] | None = None,
        maps: dict[str, HashMap | Storage] | None = None,
    ) -> None:
        if len(insns) % 8:
            raise NotEvaluable("bytecode length is not whole instructions")
        self.code = [struct.unpack_from("<BBhi", insns, i) for i in range(0, len(insns), 8)]
        self.relocs = relocs or {}
        self.maps = maps or {}
        self.steps = 0
        # Pointers spilled to the stack (8-byte stores of a register holding one): the bytes
        # say nothing, so they are remembered by (buffer, offset) until overwritten.
        self._spills: dict[tuple[int, int], Ptr | MapRef] = {}

    def run(self, ctx: bytes) -> int:
        stack = bytearray(512)
        r: list[Reg] = [0] * 11
        r[1] = Ptr(bytearray(ctx))
        r[10] = Ptr(stack, 512)
        pc = 0
        while True:
            if not 0 <= pc < len(self.code):
                raise NotEvaluable(f"jump out of the program (pc {pc})")
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise NotEvaluable("more instructions than any verified program runs")
            op, regs, off, imm = self.code[pc]
            dst, src = regs & 0xF, regs >> 4
            cls = op & 0x07
            if op == 0x18:  # ld_imm64
                if pc in self.relocs:
                    r[dst] = MapRef(self.relocs[pc])
                elif src:
                    raise NotEvaluable(f"a map reference at instruction {pc}")
                else:
                    r[dst] = (imm & M32) | ((self.code[pc + 1][3] & M32) << 32)
                pc += 2
                continue
            if op == 0x95:  # exit
                r0 = r[0]
                if not isinstance(r0, int):
                    raise NotEvaluable("returns a pointer")
                return r0 & M32
            if op == 0x85:  # call
                if src:
                    raise NotEvaluable(f"a call to a BPF function at instruction {pc}")
                r[0] = self._call(imm, r)
                r[1:6] = [0] * 5
            elif cls in (0x07, 0x04):  # alu64, alu (32-bit)
                r[dst] = self._alu_op(op, r[dst], imm if op & 0x08 == 0 else r[src], cls)
            elif cls in (0x05, 0x06):  # jmp, jmp32
                code = op & 0xF0
                b = imm if op & 0x08 == 0 else r[src]
                if (code == 0x00 and cls == 0x05) or self._jump(code, r[dst], b, cls, op):
                    pc += off  # ja, or a condition that holds
            elif cls == 0x01:  # ldx
                p = r[src]
                if not isinstance(p, Ptr) or op & 0xE0 != 0x60:
                    raise NotEvaluable(f"load at instruction {pc}")
                size = _SIZES[op & 0x18]
                if p.off + off < 0 or p.off + off + size > len(p.buf):
                    raise NotEvaluable(f"load outside its object at instruction {pc}")
                at = p.off + off
                spilled = self._spills.get((id(p.buf), at)) if size == 8 else None
                r[dst] = spilled or int.from_bytes(p.buf[at : at + size], "little")
            elif cls in (0x02, 0x03) and op & 0xE0 == 0x60:  # st / stx mem
                self._store(r[dst], off, op, imm if cls == 0x02 else r[src])
            elif op in (0xDB, 0xC3) and imm == 0x00:  # atomic add (64/32), no fetch
                self._atomic_add(r[dst], off, 8 if op == 0xDB else 4, r[src])
            else:
                raise NotEvaluable(f"opcode {op:#x} at instruction {pc}")
            pc += 1

    @staticmethod
    def _alu_op(op: int, a: Reg, b: Reg, cls: int) -> Reg:
        code = op & 0xF0
        if code == 0xB0 and cls == 0x07:  # mov64 copies pointers too
            return b & M64 if isinstance(b, int) else b
        if isinstance(a, Ptr):
            if code == 0x00 and isinstance(b, int) and cls == 0x07:
                return a.add(_signed(b))
            raise NotEvaluable("arithmetic on a pointer")
        if not isinstance(a, int) or not isinstance(b, int):
            raise NotEvaluable("arithmetic with a pointer or map")
        if op & 0x08 == 0:  # an immediate is sign-extended to 64 bits
            b = _signed(b, 32) & M64
        return _alu(code, a, b, 64 if cls == 0x07 else 32)

    @staticmethod
    def _jump(code: int, a: Reg, b: Reg, cls: int, op: int) -> bool:
        if isinstance(a, Ptr):  # only null checks on pointers
            if code not in (0x10, 0x50) or b != 0:
                raise NotEvaluable("comparison of a pointer")
            return code == 0x50
        if not isinstance(a, int) or not isinstance(b, int):
            raise NotEvaluable("comparison with a map")
        if op & 0x08 == 0:  # an immediate is sign-extended to 64 bits
            b = _signed(b, 32) & M64
        return _cond(code, a, b, 64 if cls == 0x05 else 32)

    def _store(self, p: Reg, off: int, op: int, val: Reg) -> None:
        if not isinstance(p, Ptr):
            raise NotEvaluable("store through a non-pointer")
        size = _SIZES[op & 0x18]
        at = p.off + off
        if at < 0 or at + size > len(p.buf):
            raise NotEvaluable("store outside its object")
        for k in [k for k in self._spills if k[0] == id(p.buf) and at - 8 < k[1] < at + size]:
            del self._spills[k]
        if not isinstance(val, int):
            if size != 8:
                raise NotEvaluable("a pointer stored in less than 8 bytes")
            self._spills[(id(p.buf), at)] = val
            val = 0
        p.buf[at : at + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @staticmethod
    def _atomic_add(p: Reg, off: int, size: int, add: Reg) -> None:
        if not isinstance(p, Ptr) or not isinstance(add, int):
            raise NotEvaluable("atomic add through a non-pointer")
        cur = int.from_bytes(p.buf[p.off + off : p.off + off + size], "little")
        new = (cur + add) & ((1 << (8 * size)) - 1)
        p.buf[p.off + off : p.off + off + size] = new.to_bytes(size, "little")

    def _call(self, helper: int, r: list[Reg]) -> Reg:
        ref = r[1]
        m = self.maps.get(ref.name) if isinstance(ref, MapRef) else None
        if helper == HELPER_GET_LOCAL_STORAGE and isinstance(m, Storage):
            return Ptr(m.value)
        if not isinstance(m, HashMap) or helper not in (HELPER_MAP_LOOKUP, HELPER_MAP_UPDATE):
            raise NotEvaluable(f"helper {helper}")
        kp = r[2]
        if not isinstance(kp, Ptr):
            raise NotEvaluable("map key is not a pointer")
        key = bytes(kp.buf[kp.off : kp.off + m.key_size])
        if helper == HELPER_MAP_LOOKUP:
            v = m.data.get(key)
            return Ptr(v) if v is not None else 0
        vp, flags = r[3], r[4]
        if not isinstance(vp, Ptr):
            raise NotEvaluable("map value is not a pointer")
        if flags == 1 and key in m.data:
            return (-EEXIST) & M64
        if key not in m.data and len(m.data) >= m.max_entries:
            return (-7) & M64  # -E2BIG: the hash is full
        m.data[key] = bytearray(vp.buf[vp.off : vp.off + m.value_size])
        return 0


def device_ctx(type_: int, major: int, minor: int, access_mask: int) -> bytes:
    """struct bpf_cgroup_dev_ctx for one access: access_type (access << 16 | type), major,
    minor."""
    return struct.pack("<III", (access_mask << 16) | type_, major, minor)


def run_foreign(insns: bytes, type_: int, major: int, minor: int, access_mask: int) -> bool:
    """Would a device program with no maps (a runtime's own) allow this access? NotEvaluable
    when it does more than compute from its context."""
    return Machine(insns).run(device_ctx(type_, major, minor, access_mask)) != 0
