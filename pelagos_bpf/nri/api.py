"""NRI's constants, event mask and message types, for plugin code that should not touch the wire.

Values are upstream's (containerd/nri v0.8.0 pkg/api: plugin.go, timeouts.go, event.go).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from .proto import nri_pb2
from .proto.nri_pb2 import (
    ConfigureRequest,
    ConfigureResponse,
    Container,
    ContainerAdjustment,
    ContainerEviction,
    ContainerState,
    ContainerUpdate,
    CreateContainerRequest,
    CreateContainerResponse,
    Empty,
    Hook,
    Hooks,
    LinuxContainer,
    LinuxContainerAdjustment,
    LinuxContainerUpdate,
    LinuxDevice,
    LinuxDeviceCgroup,
    LinuxPodSandbox,
    LinuxResources,
    OptionalFileMode,
    OptionalInt,
    OptionalInt64,
    OptionalUInt32,
    PodSandbox,
    RegisterPluginRequest,
    StateChangeEvent,
    StopContainerRequest,
    StopContainerResponse,
    SynchronizeRequest,
    SynchronizeResponse,
    UpdateContainerRequest,
    UpdateContainerResponse,
    UpdateContainersRequest,
    UpdateContainersResponse,
)

__all__ = [
    "ALL_EVENTS",
    "DEFAULT_REGISTRATION_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_SOCKET_PATH",
    "PLUGIN_IDX_ENV",
    "PLUGIN_NAME_ENV",
    "PLUGIN_SERVICE",
    "PLUGIN_SOCKET_ENV",
    "RUNTIME_SERVICE",
    "ConfigureRequest",
    "ConfigureResponse",
    "Container",
    "ContainerAdjustment",
    "ContainerEviction",
    "ContainerState",
    "ContainerUpdate",
    "CreateContainerRequest",
    "CreateContainerResponse",
    "Empty",
    "Event",
    "Hook",
    "Hooks",
    "LinuxContainer",
    "LinuxContainerAdjustment",
    "LinuxContainerUpdate",
    "LinuxDevice",
    "LinuxDeviceCgroup",
    "LinuxPodSandbox",
    "LinuxResources",
    "OptionalFileMode",
    "OptionalInt",
    "OptionalInt64",
    "OptionalUInt32",
    "PodSandbox",
    "RegisterPluginRequest",
    "StateChangeEvent",
    "StopContainerRequest",
    "StopContainerResponse",
    "SynchronizeRequest",
    "SynchronizeResponse",
    "UpdateContainerRequest",
    "UpdateContainerResponse",
    "UpdateContainersRequest",
    "UpdateContainersResponse",
    "check_plugin_index",
    "event_mask",
    "events_in_mask",
]

RUNTIME_SERVICE = nri_pb2.DESCRIPTOR.services_by_name["Runtime"].full_name
PLUGIN_SERVICE = nri_pb2.DESCRIPTOR.services_by_name["Plugin"].full_name

DEFAULT_SOCKET_PATH = "/var/run/nri/nri.sock"
# Set by NRI when it launches a plugin from its plugin directory: the number of an inherited,
# already connected socket (always 3 in v0.8.0), and the name and index it launched it as.
PLUGIN_SOCKET_ENV = "NRI_PLUGIN_SOCKET"
PLUGIN_NAME_ENV = "NRI_PLUGIN_NAME"
PLUGIN_IDX_ENV = "NRI_PLUGIN_IDX"

# Seconds. The runtime's defaults; v0.7+ runtimes send their configured values in Configure.
DEFAULT_REGISTRATION_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 2.0


class Event(enum.IntEnum):
    """The events a plugin can subscribe to (api.proto enum Event, v0.8.0)."""

    RUN_POD_SANDBOX = 1
    STOP_POD_SANDBOX = 2
    REMOVE_POD_SANDBOX = 3
    CREATE_CONTAINER = 4
    POST_CREATE_CONTAINER = 5
    START_CONTAINER = 6
    POST_START_CONTAINER = 7
    UPDATE_CONTAINER = 8
    POST_UPDATE_CONTAINER = 9
    STOP_CONTAINER = 10
    REMOVE_CONTAINER = 11


ALL_EVENTS = frozenset(Event)


def event_mask(events: Iterable[Event]) -> int:
    """ConfigureResponse.events for `events`: event N is bit 1 << (N - 1) (upstream
    EventMask.Set), so START_CONTAINER (6) is 0x20, not 1 << 6.

    An empty set is refused: the runtime reads a mask of 0 as every event (adaptation
    plugin.configure), the opposite of what an empty subscription means.
    """
    mask = 0
    for event in events:
        mask |= 1 << (Event(event) - 1)
    if mask == 0:
        raise ValueError("an NRI plugin must subscribe to at least one event (0 means all)")
    return mask


def events_in_mask(mask: int) -> frozenset[Event]:
    """The events a ConfigureResponse.events value subscribes to, as the runtime reads it."""
    if mask == 0:
        return ALL_EVENTS
    unknown = mask & ~((1 << len(Event)) - 1)
    if unknown:
        raise ValueError(f"event mask 0x{mask:x} has bits for unknown events: 0x{unknown:x}")
    return frozenset(e for e in Event if mask & (1 << (e - 1)))


def check_plugin_index(idx: str) -> None:
    """The runtime refuses any index but two digits (api.CheckPluginIndex)."""
    if len(idx) != 2 or not idx.isascii() or not idx.isdigit():
        raise ValueError(f"NRI plugin index {idx!r} must be two digits, 00..99")
