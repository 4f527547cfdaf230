"""A tiny eBPF interpreter for the compiled bpf/device.c (youki runs its programs in rbpf).

It runs the exact cached bytecode against Python dict maps, so the program's logic is checked
against the reference evaluator without root or a kernel. It implements only the opcodes and
helpers that program uses and raises on anything else (a new opcode fails loudly, not silently).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

M64 = (1 << 64) - 1
EEXIST = 17


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


@dataclass
class Storage:
    value: bytearray


@dataclass(frozen=True)
class MapRef:
    name: str


def _signed(v: int) -> int:
    v &= M64
    return v - (1 << 64) if v >> 63 else v


class Machine:
    def __init__(self, insns: bytes, relocs: dict[int, str], maps: dict[str, object]) -> None:
        self.code = [struct.unpack_from("<BBhi", insns, i) for i in range(0, len(insns), 8)]
        self.relocs = relocs
        self.maps = maps
        self.steps = 0

    def run(self, ctx: bytes) -> int:
        stack = bytearray(512)
        r: list[object] = [0] * 11
        r[1] = Ptr(bytearray(ctx))
        r[10] = Ptr(stack, 512)
        pc = 0
        while True:
            self.steps += 1
            op, regs, off, imm = self.code[pc]
            dst, src = regs & 0xF, regs >> 4
            cls = op & 0x07
            if op == 0x18:  # ld_imm64
                if pc in self.relocs:
                    r[dst] = MapRef(self.relocs[pc])
                else:
                    r[dst] = (imm & 0xFFFF_FFFF) | ((self.code[pc + 1][3] & 0xFFFF_FFFF) << 32)
                pc += 2
                continue
            if op == 0x95:  # exit
                return int(r[0]) & 0xFFFF_FFFF  # type: ignore[call-overload]
            if op == 0x85:
                r[0] = self._call(imm, r)
                r[1:6] = [0] * 5
            elif cls == 0x07:  # alu64
                r[dst] = self._alu(op, r[dst], imm if op & 0x08 == 0 else r[src])
            elif cls == 0x05:  # jmp
                a = r[dst]
                b = imm if op & 0x08 == 0 else r[src]
                if self._cond(op & 0xF0, a, b):
                    pc += off
            elif cls == 0x01:  # ldx
                p = r[src]
                assert isinstance(p, Ptr), f"load through non-pointer at {pc}"
                size = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[op & 0x18]
                r[dst] = int.from_bytes(p.buf[p.off + off : p.off + off + size], "little")
            elif cls == 0x03 and op & 0xE0 == 0x60:  # stx mem
                self._store(r[dst], off, op, r[src])
            elif op == 0xDB and imm == 0x00:  # atomic 64-bit add (no fetch)
                p = r[dst]
                assert isinstance(p, Ptr)
                cur = int.from_bytes(p.buf[p.off + off : p.off + off + 8], "little")
                add = r[src]
                assert isinstance(add, int)
                p.buf[p.off + off : p.off + off + 8] = ((cur + add) & M64).to_bytes(8, "little")
            else:
                raise NotImplementedError(f"opcode {op:#x} at {pc}")
            pc += 1

    @staticmethod
    def _store(p: object, off: int, op: int, val: object) -> None:
        assert isinstance(p, Ptr), "store through non-pointer"
        size = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}[op & 0x18]
        assert isinstance(val, int), "storing a pointer is not modelled"
        p.buf[p.off + off : p.off + off + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    @staticmethod
    def _alu(op: int, a: object, b: object) -> object:
        code = op & 0xF0
        if code == 0xB0:  # mov
            return b & M64 if isinstance(b, int) else b
        if isinstance(a, Ptr):
            assert code == 0x00 and isinstance(b, int), "only ptr += imm is modelled"
            return a.add(_signed(b))
        assert isinstance(a, int) and isinstance(b, int)
        b &= M64
        res = {
            0x00: lambda: a + b,
            0x50: lambda: a & b,
            0x60: lambda: a << (b & 63),
            0x70: lambda: (a & M64) >> (b & 63),
            0x40: lambda: a | b,
            0x10: lambda: a - b,
            0xA0: lambda: a ^ b,
        }[code]()
        return res & M64

    @staticmethod
    def _cond(code: int, a: object, b: object) -> bool:
        if isinstance(a, Ptr):  # only null checks on pointers
            assert code in (0x10, 0x50) and b == 0
            return code == 0x50
        assert isinstance(a, int) and isinstance(b, int)
        a &= M64
        b &= M64
        return {0x10: a == b, 0x50: a != b, 0x20: a > b, 0x30: a >= b, 0xA0: a < b}[code]

    def _call(self, helper: int, r: list[object]) -> object:
        m = self.maps[r[1].name] if isinstance(r[1], MapRef) else None
        if helper == 81:  # get_local_storage
            assert isinstance(m, Storage)
            return Ptr(m.value)
        assert isinstance(m, HashMap), f"helper {helper} on {r[1]}"
        kp = r[2]
        assert isinstance(kp, Ptr)
        key = bytes(kp.buf[kp.off : kp.off + m.key_size])
        if helper == 1:  # map_lookup_elem
            v = m.data.get(key)
            return Ptr(v) if v is not None else 0
        if helper == 2:  # map_update_elem
            vp, flags = r[3], r[4]
            assert isinstance(vp, Ptr)
            if flags == 1 and key in m.data:
                return (-EEXIST) & M64
            m.data[key] = bytearray(vp.buf[vp.off : vp.off + m.value_size])
            return 0
        raise NotImplementedError(f"helper {helper}")
