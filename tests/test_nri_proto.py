"""The committed protobuf modules are current with their .proto files, and the NRI constants
agree with the schema (scripts/gen-proto regenerates the modules)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

from pelagos_bpf.nri import api
from pelagos_bpf.nri.proto import nri_pb2, ttrpc_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "pelagos_bpf" / "nri" / "proto"


@pytest.mark.parametrize("module", [nri_pb2, ttrpc_pb2], ids=lambda m: m.__name__)
def test_committed_code_is_current(module: ModuleType, tmp_path: Path) -> None:
    """The schema protoc compiles from the .proto today equals the one embedded in the committed
    module. Comparing descriptors, not bytes, keeps the check independent of protoc's version."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="pip install -e '.[test]'")
    rel = module.DESCRIPTOR.name  # "pelagos_bpf/nri/proto/nri.proto"
    out = tmp_path / "set.pb"
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", str(ROOT / rel)])
    assert rc == 0, f"protoc failed on {rel}"
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # the Python generator does not embed them
    committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    assert fresh == committed, f"{rel} changed: run scripts/gen-proto and commit its output"

    stub = (ROOT / rel).with_name(Path(rel).stem + "_pb2.pyi").read_text()
    for msg in committed.message_type:
        assert f"class {msg.name}(" in stub, f"{msg.name} missing from the .pyi: run gen-proto"
        for field in msg.field:
            assert f"    {field.name}: " in stub, f"{msg.name}.{field.name} missing from the .pyi"


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for msg in messages:
        for field in msg.field:
            field.ClearField("json_name")
        _drop_json_names(msg.nested_type)


def test_gencode_version_matches_the_extra() -> None:
    """The [nri] extra must require at least the protobuf version the gencode was made for."""
    head = (PROTO_DIR / "nri_pb2.py").read_text()
    gencode = re.search(r"# Protobuf Python Version: (\S+)", head)
    assert gencode is not None
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'nri = ["protobuf>={gencode.group(1)}"]' in pyproject
    pin = re.search(r"GRPCIO_TOOLS=(\S+)", (ROOT / "scripts" / "gen-proto").read_text())
    assert pin is not None and pin.group(1) == "1.75.1"  # protoc 31.1 -> gencode 6.31.1
    assert gencode.group(1) == "6.31.1"


def test_event_enum_matches_schema() -> None:
    schema = {v.name: v.number for v in nri_pb2.DESCRIPTOR.enum_types_by_name["Event"].values}
    assert {e.name: e.value for e in api.Event} == {
        k: v for k, v in schema.items() if k not in ("UNKNOWN", "LAST")
    }
    assert schema["LAST"] == len(api.Event) + 1


def test_event_mask_bits() -> None:
    # Event N is bit 1 << (N - 1) (nri pkg/api/event.go EventMask.Set).
    assert api.event_mask([api.Event.RUN_POD_SANDBOX]) == 0x1
    assert api.event_mask([api.Event.START_CONTAINER]) == 0x20
    assert api.event_mask(api.ALL_EVENTS) == 0x7FF  # upstream ValidEvents
    assert api.events_in_mask(0) == api.ALL_EVENTS  # how the runtime reads 0
    assert api.events_in_mask(0x28) == {api.Event.CREATE_CONTAINER, api.Event.START_CONTAINER}
    with pytest.raises(ValueError, match="unknown events: 0x800"):
        api.events_in_mask(0x800)


def test_service_names_and_methods() -> None:
    assert api.RUNTIME_SERVICE == "nri.pkg.api.v1alpha1.Runtime"
    assert api.PLUGIN_SERVICE == "nri.pkg.api.v1alpha1.Plugin"
    plugin = nri_pb2.DESCRIPTOR.services_by_name["Plugin"]
    assert [m.name for m in plugin.methods] == [
        "Configure",
        "Synchronize",
        "Shutdown",
        "CreateContainer",
        "UpdateContainer",
        "StopContainer",
        "StateChange",
    ]


def test_field_numbers_of_the_wire_critical_messages() -> None:
    """Spot-check field numbers against upstream v0.8.0 api.proto / ttrpc request.proto."""

    def numbers(msg: str, module: ModuleType = nri_pb2) -> dict[str, int]:
        return {f.name: f.number for f in module.DESCRIPTOR.message_types_by_name[msg].fields}

    assert numbers("Request", ttrpc_pb2) == {
        "service": 1,
        "method": 2,
        "payload": 3,
        "timeout_nano": 4,
        "metadata": 5,
    }
    assert numbers("Response", ttrpc_pb2) == {"status": 1, "payload": 2}
    assert numbers("ConfigureResponse") == {"events": 2}
    assert numbers("ContainerAdjustment") == {"annotations": 2, "hooks": 5, "linux": 6}
    assert numbers("Container")["linux"] == 11
    assert numbers("PodSandbox")["namespace"] == 4
    assert numbers("LinuxContainer") == {"devices": 2, "resources": 3, "cgroups_path": 5}
    assert numbers("LinuxResources") == {"devices": 7}
