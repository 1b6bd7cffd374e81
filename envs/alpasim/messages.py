"""AlpaSim v0 gRPC protocol: message classes, service tables, stubs and server handlers.

This module is the one place that knows the wire protocol (``shared/specs/alpasim_protocol.md``). The
``.proto`` files live in ``envs/alpasim/protocol/``; ``scripts/gen_alpasim_proto.py`` compiles them into
``envs/alpasim/protocol/generated/descriptors.py``, which this module loads into a PRIVATE descriptor
pool. So our classes coexist with an installed ``alpasim_grpc`` (whose ``common.Vec3`` etc. live in the
default pool) in one process; the bytes on the wire are identical.

API (stable; other modules import these names):

Message classes (ordinary protobuf message classes: ``Cls(field=...)``, ``.SerializeToString()``,
``Cls.FromString(b)``), one flat namespace for all four proto packages:

- package ``common``: ``Empty``, ``SessionRequestStatus``, ``Vec3``, ``Quat``, ``Pose``, ``PoseAtTime``,
  ``Trajectory``, ``DynamicState``, ``StateAtTime``, ``AABB``, ``VersionId`` (``VersionId.APIVersion``),
  ``AvailableScenesReturn``.
- package ``egodriver``: ``Route``, ``GroundTruth``, ``DriveSessionRequest`` (nested ``DebugInfo``,
  ``RolloutSpec``, ``RolloutSpec.VehicleDefinition``), ``DriveSessionCloseRequest``,
  ``RolloutCameraImage`` (nested ``CameraImage``), ``RolloutEgoTrajectory``, ``RouteRequest``,
  ``GroundTruthRequest``, ``DriveRequest``, ``DriveResponse`` (nested ``DebugInfo``).
- package ``nre.grpc.protos.sensorsim``: ``AvailableCamerasReturn`` (nested ``AvailableCamera``),
  ``CameraSpec``, ``OpenCVPinholeCameraParam``, ``OpenCVFisheyeCameraParam``, ``FthetaCameraParam``,
  ``BivariateWindshieldModelParameters``; enum ``ShutterType``.
- runtime (no package): ``RolloutSpec``, ``SimulationRequest`` (nested ``DriverAddress``),
  ``ScenePrefetchRequest``, ``SceneMetadata``, ``SceneInfo``, ``ServiceCapacity``, ``RuntimeInfo``,
  ``SimulationReturn`` (nested ``RolloutReturn``, ``TimestepMetric``); enums ``TimeAggregation``,
  ``RolloutErrorCode``.

Enums are protobuf enum wrappers (``TimeAggregation.Value("TIME_AGGREGATION_MAX")``,
``TimeAggregation.Name(3)``); their values are also module constants: ``TIME_AGGREGATION_UNSPECIFIED``
… ``TIME_AGGREGATION_LAST`` (0…5), ``ROLLOUT_ERROR_CODE_NONE`` / ``_UNSPECIFIED`` / ``_INVALID_SCENE``
(0, 1, 2), ``SHUTTER_TYPE_GLOBAL`` (5).

Services:

- ``EGODRIVER_SERVICE = "egodriver.EgodriverService"``, ``RUNTIME_SERVICE = "RuntimeService"``.
- ``EGODRIVER_RPCS``, ``RUNTIME_RPCS``: ``{rpc name: Rpc}``, read from the compiled service descriptors;
  ``Rpc(service, name, request, response)`` with ``.path`` (``"/egodriver.EgodriverService/drive"``).
- ``Stub(channel, rpcs)``: a client; each rpc is a callable attribute taking ``(request, timeout=...,
  metadata=..., wait_for_ready=...)`` like generated gRPC stubs. ``egodriver_stub(channel)``,
  ``runtime_stub(channel)``.
- ``service_handler(rpcs, impl) -> grpc.GenericRpcHandler``: serves every rpc that ``impl`` has a
  method for, named like the rpc, ``method(request, context) -> response`` (sync, or ``async def``
  for a ``grpc.aio`` server). Requests are parsed inside the handler so a malformed message gets
  ``INVALID_ARGUMENT`` naming the rpc (gRPC's own deserializer path would give ``INTERNAL``); rpcs
  ``impl`` lacks answer ``UNIMPLEMENTED``.
- ``channel_options(max_message_bytes)`` / ``server_options(max_message_bytes)``: gRPC options that cap
  message sizes both ways (oversized messages fail with ``RESOURCE_EXHAUSTED``);
  ``DEFAULT_MAX_MESSAGE_BYTES`` = 64 MiB (camera JPEGs and long egomotion histories fit).
- ``is_unimplemented(err)``: True for an ``UNIMPLEMENTED`` ``grpc.RpcError`` (a peer that lacks a newer
  rpc: "not supported", not a crash).
- ``GRPC_API_VERSION = (0, 54, 0)`` (the upstream API package version the spec describes);
  ``version_id(version_id, git_hash="") -> VersionId`` stamped with it.
- ``grpc_target(ip, port) -> str``: a channel target ("host:port", IPv6 literals bracketed).

Conversions between these messages and numpy arrays / frames live in ``envs/alpasim/convert.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper
from google.protobuf.message import DecodeError, Message

from envs.alpasim.protocol.generated.descriptors import FILES

EGODRIVER_SERVICE = "egodriver.EgodriverService"
RUNTIME_SERVICE = "RuntimeService"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_API_VERSION = (0, 54, 0)


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for _name, data in FILES:
        pool.AddSerializedFile(data)
    return pool


POOL = _build_pool()


def _cls(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


def _enum(full_name: str) -> enum_type_wrapper.EnumTypeWrapper:
    return enum_type_wrapper.EnumTypeWrapper(POOL.FindEnumTypeByName(full_name))


# common
Empty = _cls("common.Empty")
SessionRequestStatus = _cls("common.SessionRequestStatus")
Vec3 = _cls("common.Vec3")
Quat = _cls("common.Quat")
Pose = _cls("common.Pose")
PoseAtTime = _cls("common.PoseAtTime")
Trajectory = _cls("common.Trajectory")
DynamicState = _cls("common.DynamicState")
StateAtTime = _cls("common.StateAtTime")
AABB = _cls("common.AABB")
VersionId = _cls("common.VersionId")
AvailableScenesReturn = _cls("common.AvailableScenesReturn")

# nre.grpc.protos.sensorsim
ShutterType = _enum("nre.grpc.protos.sensorsim.ShutterType")
AvailableCamerasReturn = _cls("nre.grpc.protos.sensorsim.AvailableCamerasReturn")
CameraSpec = _cls("nre.grpc.protos.sensorsim.CameraSpec")
OpenCVPinholeCameraParam = _cls("nre.grpc.protos.sensorsim.OpenCVPinholeCameraParam")
OpenCVFisheyeCameraParam = _cls("nre.grpc.protos.sensorsim.OpenCVFisheyeCameraParam")
FthetaCameraParam = _cls("nre.grpc.protos.sensorsim.FthetaCameraParam")
BivariateWindshieldModelParameters = _cls("nre.grpc.protos.sensorsim.BivariateWindshieldModelParameters")

# egodriver
Route = _cls("egodriver.Route")
GroundTruth = _cls("egodriver.GroundTruth")
DriveSessionRequest = _cls("egodriver.DriveSessionRequest")
DriveSessionCloseRequest = _cls("egodriver.DriveSessionCloseRequest")
RolloutCameraImage = _cls("egodriver.RolloutCameraImage")
RolloutEgoTrajectory = _cls("egodriver.RolloutEgoTrajectory")
RouteRequest = _cls("egodriver.RouteRequest")
GroundTruthRequest = _cls("egodriver.GroundTruthRequest")
DriveRequest = _cls("egodriver.DriveRequest")
DriveResponse = _cls("egodriver.DriveResponse")

# runtime (no package)
TimeAggregation = _enum("TimeAggregation")
RolloutErrorCode = _enum("RolloutErrorCode")
RolloutSpec = _cls("RolloutSpec")
SimulationRequest = _cls("SimulationRequest")
ScenePrefetchRequest = _cls("ScenePrefetchRequest")
SceneMetadata = _cls("SceneMetadata")
SceneInfo = _cls("SceneInfo")
ServiceCapacity = _cls("ServiceCapacity")
RuntimeInfo = _cls("RuntimeInfo")
SimulationReturn = _cls("SimulationReturn")

TIME_AGGREGATION_UNSPECIFIED = TimeAggregation.Value("TIME_AGGREGATION_UNSPECIFIED")
TIME_AGGREGATION_MEAN = TimeAggregation.Value("TIME_AGGREGATION_MEAN")
TIME_AGGREGATION_MEDIAN = TimeAggregation.Value("TIME_AGGREGATION_MEDIAN")
TIME_AGGREGATION_MAX = TimeAggregation.Value("TIME_AGGREGATION_MAX")
TIME_AGGREGATION_MIN = TimeAggregation.Value("TIME_AGGREGATION_MIN")
TIME_AGGREGATION_LAST = TimeAggregation.Value("TIME_AGGREGATION_LAST")
ROLLOUT_ERROR_CODE_NONE = RolloutErrorCode.Value("ROLLOUT_ERROR_CODE_NONE")
ROLLOUT_ERROR_CODE_UNSPECIFIED = RolloutErrorCode.Value("ROLLOUT_ERROR_CODE_UNSPECIFIED")
ROLLOUT_ERROR_CODE_INVALID_SCENE = RolloutErrorCode.Value("ROLLOUT_ERROR_CODE_INVALID_SCENE")
SHUTTER_TYPE_GLOBAL = ShutterType.Value("GLOBAL")


@dataclass(frozen=True)
class Rpc:
    """One unary rpc of a service."""

    service: str
    """Full service name, e.g. "egodriver.EgodriverService" (the first part of the path)."""
    name: str
    """rpc name, e.g. "drive"."""
    request: type[Message]
    """Request message class (from this module's private pool)."""
    response: type[Message]
    """Response message class."""

    @property
    def path(self) -> str:
        """The gRPC method path, "/<service>/<rpc>"."""
        return f"/{self.service}/{self.name}"


def _rpcs(service_full_name: str) -> dict[str, Rpc]:
    service = POOL.FindServiceByName(service_full_name)
    return {
        m.name: Rpc(service_full_name, m.name, message_factory.GetMessageClass(m.input_type),
                    message_factory.GetMessageClass(m.output_type))
        for m in service.methods
    }


EGODRIVER_RPCS: dict[str, Rpc] = _rpcs(EGODRIVER_SERVICE)
RUNTIME_RPCS: dict[str, Rpc] = _rpcs(RUNTIME_SERVICE)


class Stub:
    """A client of one service: ``stub.<rpc>(request, timeout=...)`` returns the response message.

    Each attribute is a ``grpc.UnaryUnaryMultiCallable`` (so ``.future(...)`` and ``.with_call(...)``
    work too). Works on ``grpc.Channel`` and ``grpc.aio.Channel`` alike.
    """

    def __init__(self, channel: grpc.Channel, rpcs: Mapping[str, Rpc]):
        self.rpcs = dict(rpcs)
        for name, rpc in self.rpcs.items():
            setattr(self, name, channel.unary_unary(
                rpc.path, request_serializer=rpc.request.SerializeToString,
                response_deserializer=rpc.response.FromString))

    def __getattr__(self, name: str) -> Any:
        # only reached for names that are not rpcs of this service
        raise AttributeError(f"{name!r} is not an rpc of this stub; rpcs: {sorted(self.__dict__.get('rpcs', {}))}")


def egodriver_stub(channel: grpc.Channel) -> Stub:
    """A client of ``egodriver.EgodriverService`` on ``channel``."""
    return Stub(channel, EGODRIVER_RPCS)


def runtime_stub(channel: grpc.Channel) -> Stub:
    """A client of ``RuntimeService`` on ``channel``."""
    return Stub(channel, RUNTIME_RPCS)


def _parse(rpc: Rpc, data: bytes) -> Message | None:
    try:
        return rpc.request.FromString(data)
    except DecodeError:
        return None


def _sync_behavior(rpc: Rpc, method: Callable[..., Any]) -> Callable[[bytes, Any], Any]:
    def behavior(data: bytes, context: grpc.ServicerContext) -> Any:
        request = _parse(rpc, data)
        if request is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{rpc.path}: request is not a valid {rpc.request.DESCRIPTOR.full_name} "
                          f"({len(data)} bytes)")
        return method(request, context)

    return behavior


def _async_behavior(rpc: Rpc, method: Callable[..., Any]) -> Callable[[bytes, Any], Any]:
    async def behavior(data: bytes, context: Any) -> Any:
        request = _parse(rpc, data)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{rpc.path}: request is not a valid {rpc.request.DESCRIPTOR.full_name} "
                                f"({len(data)} bytes)")
        return await method(request, context)

    return behavior


def service_handler(rpcs: Mapping[str, Rpc], impl: object) -> grpc.GenericRpcHandler:
    """A generic handler serving each rpc of ``rpcs`` that ``impl`` has a same-named method for.

    ``impl.<rpc>(request, context) -> response`` may be a plain method (``grpc.server``) or an
    ``async def`` (``grpc.aio.server``). Register with ``server.add_generic_rpc_handlers((handler,))``.
    """
    services = {rpc.service for rpc in rpcs.values()}
    if len(services) != 1:
        raise ValueError(f"service_handler: rpcs must belong to one service, got {sorted(services)}")
    handlers = {}
    for name, rpc in rpcs.items():
        method = getattr(impl, name, None)
        if method is None:
            continue
        make = _async_behavior if inspect.iscoroutinefunction(method) else _sync_behavior
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            make(rpc, method), request_deserializer=None, response_serializer=rpc.response.SerializeToString)
    if not handlers:
        raise ValueError(f"service_handler: {type(impl).__name__} implements none of {sorted(rpcs)}")
    return grpc.method_handlers_generic_handler(services.pop(), handlers)


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC server options capping received and sent message sizes."""
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel options capping message sizes (the same keys as the server's)."""
    return server_options(max_message_bytes)


def is_unimplemented(err: BaseException) -> bool:
    """True when ``err`` is a gRPC error with status UNIMPLEMENTED (the peer lacks that rpc)."""
    return isinstance(err, grpc.RpcError) and getattr(err, "code", lambda: None)() == grpc.StatusCode.UNIMPLEMENTED


def version_id(version: str, git_hash: str = "") -> Message:
    """A ``common.VersionId`` stamped with ``GRPC_API_VERSION``."""
    major, minor, patch = GRPC_API_VERSION
    return VersionId(version_id=version, git_hash=git_hash,
                     grpc_api_version=VersionId.APIVersion(major=major, minor=minor, patch=patch))


def grpc_target(ip: str, port: int) -> str:
    """The channel target for a ``DriverAddress``-style (ip, port); IPv6 literals get brackets."""
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    host = ip.strip() or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}"
