"""A small CRI (runtime.v1) client over grpcio: run a pod with one container, exec, remove.

Why our own: crictl is in no Debian suite, and the tests need only a handful of calls. The
stubs are built from cri_pb2's service descriptors (method path `/runtime.v1.<Service>/<Name>`),
so no *_pb2_grpc.py is generated. A pod is what kubelet would make of a one-container pod:
RunPodSandbox (pause container, network namespace from CNI or the node's), CreateContainer,
StartContainer; its cgroups sit under `cgroup_parent` (cgroupfs driver), which `remove_pod`
removes after the runtime has removed the containers, as kubelet does for its pod cgroups.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from . import cri_pb2 as pb

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
SOCKET_ENV = "PELAGOS_CRI_SOCKET"
IMAGE_ENV = "PELAGOS_CRI_IMAGE"  # the container image (the containerd guest exports it)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_BASE = "/pelagos-cri"  # pods' cgroups: /pelagos-cri/pod<uid>/<container id>
PARENT_LABEL = "pelagos-cri.test/cgroup-parent"  # where remove_pod finds the pod's cgroup
CALL_TIMEOUT = 120.0  # one CRI call under TCG on a loaded machine; pod start is ~1 s idle
READY_TIMEOUT = 120.0


class CriError(RuntimeError):
    """A CRI call failed: the method, the gRPC status code and the runtime's message."""

    def __init__(self, method: str, code: grpc.StatusCode | None, details: str) -> None:
        self.method, self.code, self.details = method, code, details
        self.pod: str | None = None  # run_pod(keep_failed=True): what is left to look at
        self.container: str | None = None
        name = code.name if code is not None else "ERROR"
        super().__init__(f"{method}: {name}: {details}")


@dataclass(frozen=True)
class Pod:
    """A running one-container pod: the sandbox id, the container id, the container's pid."""

    pod: str
    container: str
    pid: int

    def json(self) -> str:
        return json.dumps({"pod": self.pod, "container": self.container, "pid": self.pid})


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


def _method(service: str, name: str) -> tuple[str, type[Message], type[Message]]:
    m = pb.DESCRIPTOR.services_by_name[service].methods_by_name[name]
    req: type[Message] = getattr(pb, m.input_type.name)
    resp: type[Message] = getattr(pb, m.output_type.name)
    return f"/{m.containing_service.full_name}/{name}", req, resp


def socket_path(socket: str | None = None) -> str:
    return socket or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def cgroup_parent_for(uid: str) -> str:
    """The cgroupfs parent of a pod, as kubelet's `/kubepods/pod<uid>` (one dir per pod)."""
    return f"{CGROUP_BASE}/pod{uid}"


class Client:
    """One gRPC channel to the runtime's CRI socket (a context manager: closes the channel)."""

    def __init__(self, socket: str | None = None, timeout: float = CALL_TIMEOUT) -> None:
        self.socket = socket_path(socket)
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self._images_seen: set[str] = set()
        self.calls: list[tuple[str, float]] = []  # (method, seconds) per call, for benchmarks

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, service: str, name: str, **fields: Any) -> Any:
        """One unary call; a gRPC failure becomes CriError naming the method."""
        path, req, resp = _method(service, name)
        stub: Callable[..., Any] = self.channel.unary_unary(
            path, request_serializer=req.SerializeToString, response_deserializer=resp.FromString
        )
        t0 = time.perf_counter()
        try:
            return stub(req(**fields), timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise CriError(name, code, details or "") from None
        finally:
            self.calls.append((name, time.perf_counter() - t0))

    def rt(self, name: str, **fields: Any) -> Any:
        return self.call("RuntimeService", name, **fields)

    # ---- readiness and images ----

    def version(self) -> pb.VersionResponse:
        r: pb.VersionResponse = self.rt("Version", version="v1")
        return r

    def image(self, ref: str) -> pb.Image | None:
        """The runtime's record of image `ref`, None when it has none."""
        r = self.call("ImageService", "ImageStatus", image=pb.ImageSpec(image=ref))
        return r.image if r.HasField("image") else None

    def wait_ready(self, image: str, timeout: float = READY_TIMEOUT) -> None:
        """Until the CRI answers and knows `image`: the guest imports images with ctr while the
        CRI plugin learns of them from events, so a first pod could otherwise race the import."""
        if not Path(self.socket).exists():
            raise CriError("wait_ready", None, f"no CRI socket at {self.socket}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.image(image) is not None:
                    self._images_seen.add(image)
                    return
                last = f"the runtime has no image {image!r}"
            except CriError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise CriError("wait_ready", None, f"not ready after {timeout:.0f}s: {last}")
            time.sleep(0.1)

    def default_image(self) -> str:
        image = os.environ.get(IMAGE_ENV)
        if not image:
            raise CriError("run_pod", None, f"no image: pass one or set ${IMAGE_ENV}")
        return image

    # ---- pods ----

    def run_pod(
        self,
        command: Sequence[str],
        *,
        annotations: Mapping[str, str] | None = None,
        container_annotations: Mapping[str, str] | None = None,
        namespace: str = "default",
        name: str | None = None,
        container_name: str = "main",
        host_network: bool = False,
        sysctls: Mapping[str, str] | None = None,
        image: str | None = None,
        cgroup_parent: str | None = None,
        keep_failed: bool = False,
    ) -> Pod:
        """Run a pod with one container running `command`; return its ids and pid.

        A failure after the sandbox exists removes the sandbox before raising, so a refused
        container (an NRI plugin's error at CreateContainer) leaves nothing behind; unless
        `keep_failed`: then the CriError names the pod and container (None: not created) for
        the caller to inspect and remove.
        """
        if image is None:  # the guest's own image: wait until the CRI has learnt of it
            image = self.default_image()
            if image not in self._images_seen:
                self.wait_ready(image)
        uid = uuid.uuid4().hex
        name = name or f"pelagos-{uid[:8]}"
        parent = cgroup_parent or cgroup_parent_for(uid)
        mode = pb.NODE if host_network else pb.POD
        sandbox = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
            hostname="" if host_network else name,  # runc sets none without its own UTS ns
            labels={PARENT_LABEL: parent},
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=mode)
                ),
                sysctls=dict(sysctls or {}),
            ),
        )
        pod_id = self.rt("RunPodSandbox", config=sandbox).pod_sandbox_id
        cid = None
        try:
            config = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name=container_name),
                image=pb.ImageSpec(image=image),
                command=list(command),
                annotations=dict(container_annotations or {}),
            )
            cid = self.rt(
                "CreateContainer", pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox
            ).container_id
            self.rt("StartContainer", container_id=cid)
            return Pod(pod=pod_id, container=cid, pid=self.pid(cid))
        except BaseException as e:
            if keep_failed and isinstance(e, CriError):
                e.pod, e.container = pod_id, cid
                raise
            try:
                self.remove_pod(pod_id)
            except CriError as cleanup:
                e.add_note(f"and removing the pod failed: {cleanup}")
            raise

    def pid(self, container: str) -> int:
        """The container's init pid (containerd's verbose status info)."""
        r = self.rt("ContainerStatus", container_id=container, verbose=True)
        try:
            return int(json.loads(r.info["info"])["pid"])
        except (KeyError, ValueError, TypeError) as e:
            raise CriError("ContainerStatus", None, f"no pid in the verbose info ({e})") from None

    def container_info(self, container: str) -> dict[str, Any]:
        """containerd's verbose container info: pid, runtimeSpec (the OCI config), ..."""
        r = self.rt("ContainerStatus", container_id=container, verbose=True)
        info: dict[str, Any] = json.loads(r.info.get("info", "{}"))
        return info

    def pod_netns(self, pod: str) -> str | None:
        """The pod's network namespace (/var/run/netns/cni-...: pyroute2's IPRoute(netns=) takes
        it), None for a host-network pod. Containers join it through the sandbox's pid."""
        r = self.rt("PodSandboxStatus", pod_sandbox_id=pod, verbose=True)
        spec = json.loads(r.info.get("info", "{}")).get("runtimeSpec", {})
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network":
                return str(ns.get("path") or "") or None
        return None

    def exec_sync(self, container: str, cmd: Sequence[str], timeout: int = 60) -> ExecResult:
        """Run `cmd` in the container (runc exec) and wait for it."""
        r = self.rt("ExecSync", container_id=container, cmd=list(cmd), timeout=timeout)
        return ExecResult(r.stdout, r.stderr, r.exit_code)

    def containers(self, pod: str | None = None) -> list[pb.Container]:
        f = pb.ContainerFilter(pod_sandbox_id=pod or "")
        return list(self.rt("ListContainers", filter=f).containers)

    def pods(self) -> list[pb.PodSandbox]:
        return list(self.rt("ListPodSandbox", filter=pb.PodSandboxFilter()).items)

    def remove_pod(self, pod: str) -> None:
        """Stop and remove the pod (and its containers), then its cgroup parent (cgroupfs).
        Removing a pod that is already gone is not an error (CRI's calls are idempotent)."""
        try:
            labels = self.rt("PodSandboxStatus", pod_sandbox_id=pod).status.labels
        except CriError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return
            raise
        self.rt("StopPodSandbox", pod_sandbox_id=pod)
        self.rt("RemovePodSandbox", pod_sandbox_id=pod)
        parent = labels.get(PARENT_LABEL, "")
        if parent.startswith(CGROUP_BASE + "/"):  # only the cgroups this client named
            remove_cgroup(CGROUP_ROOT / parent.lstrip("/"))


def remove_cgroup(d: Path, timeout: float = 30.0) -> None:
    """rmdir an emptied pod cgroup; EBUSY while the last task exits, so retry to a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise CriError("remove_pod", None, f"cannot remove {d}: {e}") from None
        time.sleep(0.05)


_clients: dict[str, Client] = {}


def client(socket: str | None = None) -> Client:
    """A shared Client per socket (for the module-level functions below)."""
    path = socket_path(socket)
    if path not in _clients:
        _clients[path] = Client(path)
    return _clients[path]


def run_pod(command: Sequence[str], *, socket: str | None = None, **kw: Any) -> Pod:
    """`Client.run_pod` on the shared client (keywords as there)."""
    return client(socket).run_pod(command, **kw)


def exec_sync(container: str, cmd: Sequence[str], *, socket: str | None = None) -> ExecResult:
    return client(socket).exec_sync(container, cmd)


def remove_pod(pod: str, *, socket: str | None = None) -> None:
    client(socket).remove_pod(pod)
