"""Regenerate cri_pb2.py and cri_pb2.pyi from cri.proto: `python -m tests.cri.regen`.

`python -m tests.cri.regen --against api.proto` checks instead that every message, field
(number, type, label), enum value and method of the subset is upstream's (k8s.io/cri-api's
pkg/apis/runtime/v1/api.proto), for when the subset grows.

Why committed, generated code: the client runs from a shell inside a TCG guest, where running
protoc on every call would cost seconds; the committed module imports in milliseconds.
tests/test_cri_client.py proves it is current by compiling cri.proto again and comparing the
descriptors (not the text, which carries the generator's version).
Only messages are generated (no *_pb2_grpc.py): the client builds its stubs from the service
descriptors, so there is one generated file and it needs grpcio only at run time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2 as dpb

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("tests/cri/cri.proto")  # relative to ROOT: it is the descriptor's name


def protoc(proto: Path, *out_args: str) -> None:
    """Run grpcio-tools' protoc on `proto` (relative to ROOT) with the given output options."""
    argv = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", *out_args, str(proto)]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"protoc failed: {r.stderr.strip() or r.stdout.strip()}")


def compiled(proto: Path = PROTO) -> dpb.FileDescriptorProto:
    """`proto` compiled now, without json_name (the generated module's copy has none)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pb"
        protoc(proto, f"--descriptor_set_out={out}")
        fdp = dpb.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for m in _messages(fdp.message_type):
        for f in m.field:
            f.ClearField("json_name")
    return fdp


def _messages(ms: list[dpb.DescriptorProto]) -> list[dpb.DescriptorProto]:
    return [x for m in ms for x in (m, *_messages(list(m.nested_type)))]


def differences(subset: dpb.FileDescriptorProto, upstream: dpb.FileDescriptorProto) -> list[str]:
    """Where the subset departs from upstream (an empty list: it is a true subset)."""
    out: list[str] = []

    def message(m: dpb.DescriptorProto, um: dpb.DescriptorProto | None, path: str) -> None:
        if um is None:
            out.append(f"{path}: not upstream")
            return
        fields = {f.name: f for f in um.field}
        for f in m.field:
            u = fields.get(f.name)
            key = (f.number, f.label, f.type, f.type_name)
            if u is None or (u.number, u.label, u.type, u.type_name) != key:
                out.append(f"{path}.{f.name}: {key} upstream {u and (u.number, u.type_name)}")
        nested = {n.name: n for n in um.nested_type}
        for n in m.nested_type:
            message(n, nested.get(n.name), f"{path}.{n.name}")

    top = {m.name: m for m in upstream.message_type}
    for m in subset.message_type:
        message(m, top.get(m.name), m.name)
    enums = {e.name: {v.name: v.number for v in e.value} for e in upstream.enum_type}
    for e in subset.enum_type:
        values = {v.name: v.number for v in e.value}
        if any(enums.get(e.name, {}).get(k) != n for k, n in values.items()):
            out.append(f"enum {e.name}: {values} upstream {enums.get(e.name)}")
    services = {s.name: {m.name: m for m in s.method} for s in upstream.service}
    for s in subset.service:
        for m in s.method:
            u = services.get(s.name, {}).get(m.name)
            if u is None or (u.input_type, u.output_type) != (m.input_type, m.output_type):
                out.append(f"{s.name}.{m.name}: not upstream's")
    if subset.package != upstream.package:
        out.append(f"package {subset.package} upstream {upstream.package}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cri.regen", description=__doc__)
    ap.add_argument("--against", type=Path, help="check the subset against upstream api.proto")
    args = ap.parse_args(argv)
    if args.against:
        up = args.against.resolve()
        try:
            rel = up.relative_to(ROOT)
        except ValueError:
            print(f"put {up.name} inside {ROOT} (protoc's include path)", file=sys.stderr)
            return 2
        diffs = differences(compiled(), compiled(rel))
        print("\n".join(diffs) or f"{PROTO} is a subset of {up}")
        return 1 if diffs else 0
    protoc(PROTO, f"--python_out={ROOT}", f"--pyi_out={ROOT}")
    print(f"regenerated {PROTO.with_name('cri_pb2.py')} and {PROTO.with_name('cri_pb2.pyi')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
