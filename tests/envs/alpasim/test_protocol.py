"""The AlpaSim protocol module: golden wire bytes written by hand from the spec's field numbers and
wire types, the spec's field tables checked against our descriptors, the RPC paths, the private
descriptor pool, the generated code being current, and the generic server handler's statuses."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor as FD

from envs.alpasim import messages as m

REPO = Path(__file__).resolve().parents[3]

# ---- hand encoding: wire types 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32 ----------------


def varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def ld(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def fixed64(field: int, value: int) -> bytes:
    return key(field, 1) + struct.pack("<Q", value)


def f32(field: int, value: float) -> bytes:
    return key(field, 5) + struct.pack("<f", value)


def f64(field: int, value: float) -> bytes:
    return key(field, 1) + struct.pack("<d", value)


def uint(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def test_hand_encoder_matches_the_protobuf_docs_example():
    # the protobuf encoding guide's example: field 1 = 150 -> 08 96 01
    assert uint(1, 150) == bytes.fromhex("089601")
    assert varint(300) == bytes.fromhex("ac02")


# ---- golden messages --------------------------------------------------------------------------------
def test_drive_request_golden_bytes():
    msg = m.DriveRequest(session_uuid="ab", time_now_us=1_000_000, time_query_us=1_100_000, renderer_data=b"\x01")
    golden = (b"\x0a\x02ab"                                   # 1: string, wire 2
              b"\x19" + struct.pack("<Q", 1_000_000) +        # 3: fixed64, wire 1 -> key 0x19
              b"\x21" + struct.pack("<Q", 1_100_000) +        # 4: fixed64 -> key 0x21
              b"\x2a\x01\x01")                                # 5: bytes -> key 0x2a
    assert msg.SerializeToString() == golden
    assert m.DriveRequest.FromString(golden) == msg


def test_drive_response_with_trajectory_golden_bytes():
    traj = m.Trajectory(poses=[
        m.PoseAtTime(pose=m.Pose(vec=m.Vec3(x=1.5, y=-2.0, z=0.0), quat=m.Quat(w=1.0)), timestamp_us=7),
        m.PoseAtTime(pose=m.Pose(vec=m.Vec3(x=2.0), quat=m.Quat(w=0.5, z=0.25)), timestamp_us=100_007),
    ])
    msg = m.DriveResponse(trajectory=traj, terminate_session=True)
    # proto3 leaves zero scalars out: Vec3.z = 0 and the quaternions' zero parts are absent
    pose0 = ld(1, ld(1, f32(1, 1.5) + f32(2, -2.0)) + ld(2, f32(1, 1.0))) + fixed64(2, 7)
    pose1 = ld(1, ld(1, f32(1, 2.0)) + ld(2, f32(1, 0.5) + f32(4, 0.25))) + fixed64(2, 100_007)
    golden = ld(2, ld(1, pose0) + ld(1, pose1)) + uint(4, 1)
    assert msg.SerializeToString() == golden
    assert m.DriveResponse.FromString(golden) == msg


def test_simulation_request_with_start_offset_and_seed_golden_bytes():
    msg = m.SimulationRequest(
        available_drivers=[m.SimulationRequest.DriverAddress(ip="127.0.0.1", port=50051)],
        rollout_specs=[m.RolloutSpec(scenario_id="clipgt-x", nr_rollouts=2, session_uuids=["a", "b"],
                                     start_time_offset_us=500_000, random_seed=7)],
        n_concurrent_per_driver=2)
    driver = ld(1, b"127.0.0.1") + uint(2, 50051)
    spec = (ld(1, b"clipgt-x") + uint(2, 2) + ld(3, b"a") + ld(3, b"b")
            + fixed64(4, 500_000) + fixed64(5, 7))
    golden = ld(1, driver) + ld(2, spec) + uint(3, 2)
    assert golden[:2] == b"\x0a\x0f" and b"\x21\x20\xa1\x07\x00\x00\x00\x00\x00" in golden  # offset: key 0x21
    assert msg.SerializeToString() == golden
    assert m.SimulationRequest.FromString(golden) == msg


def test_rollout_return_with_metrics_golden_bytes():
    rr = m.SimulationReturn.RolloutReturn(
        rollout_spec=m.RolloutSpec(scenario_id="s", nr_rollouts=1),
        success=True, rollout_uuid="u",
        timestep_metrics=[m.SimulationReturn.TimestepMetric(
            name="progress", timestamps_us=[100, 200], values=[0.5, 1.0], valid=[True, False],
            time_aggregation=m.TIME_AGGREGATION_LAST)],
        error_code=m.ROLLOUT_ERROR_CODE_NONE)
    rr.aggregated_metrics["progress"] = 1.0
    # proto3 packs repeated scalars: one length-delimited field each
    metric = (ld(1, b"progress") + ld(2, struct.pack("<QQ", 100, 200)) + ld(3, struct.pack("<dd", 0.5, 1.0))
              + ld(4, b"\x01\x00") + uint(5, 5))
    golden = (ld(1, ld(1, b"s") + uint(2, 1)) + uint(2, 1) + ld(3, b"u") + ld(5, metric)
              + ld(6, ld(1, b"progress") + f64(2, 1.0)))        # map entry: key 1, value 2
    assert rr.SerializeToString() == golden
    assert m.SimulationReturn.RolloutReturn.FromString(golden) == rr
    ret = m.SimulationReturn(rollout_returns=[rr])
    assert ret.SerializeToString() == ld(6, golden)


# ---- the spec's tables --------------------------------------------------------------------------------
F, D, S, U, B, BY, X64 = FD.TYPE_FLOAT, FD.TYPE_DOUBLE, FD.TYPE_STRING, FD.TYPE_UINT32, FD.TYPE_BOOL, \
    FD.TYPE_BYTES, FD.TYPE_FIXED64
MSG, ENUM = FD.TYPE_MESSAGE, FD.TYPE_ENUM
R = "repeated"
SENS = "nre.grpc.protos.sensorsim"
SPEC: dict[str, dict[str, tuple]] = {
    "common.Vec3": {"x": (1, F), "y": (2, F), "z": (3, F)},
    "common.Quat": {"w": (1, F), "x": (2, F), "y": (3, F), "z": (4, F)},
    "common.Pose": {"vec": (1, MSG, "common.Vec3"), "quat": (2, MSG, "common.Quat")},
    "common.PoseAtTime": {"pose": (1, MSG, "common.Pose"), "timestamp_us": (2, X64)},
    "common.Trajectory": {"poses": (1, MSG, "common.PoseAtTime", R)},
    "common.DynamicState": {"angular_velocity": (1, MSG, "common.Vec3"), "linear_velocity": (2, MSG, "common.Vec3"),
                            "linear_acceleration": (3, MSG, "common.Vec3"),
                            "angular_acceleration": (4, MSG, "common.Vec3")},
    "common.StateAtTime": {"timestamp_us": (1, X64), "pose": (2, MSG, "common.Pose"),
                           "state": (3, MSG, "common.DynamicState")},
    "common.AABB": {"size_x": (1, F), "size_y": (2, F), "size_z": (3, F)},
    "common.VersionId": {"version_id": (1, S), "git_hash": (2, S),
                         "grpc_api_version": (3, MSG, "common.VersionId.APIVersion")},
    "common.VersionId.APIVersion": {"major": (1, U), "minor": (2, U), "patch": (3, U)},
    "common.AvailableScenesReturn": {"scene_ids": (1, S, None, R)},
    "egodriver.Route": {"waypoints": (1, MSG, "common.Vec3", R), "timestamp_us": (2, X64)},
    "egodriver.GroundTruth": {"trajectory": (1, MSG, "common.Trajectory"), "timestamp_us": (2, X64)},
    "egodriver.DriveSessionRequest": {
        "session_uuid": (1, S), "random_seed": (2, X64),
        "debug_info": (4, MSG, "egodriver.DriveSessionRequest.DebugInfo"),
        "rollout_spec": (5, MSG, "egodriver.DriveSessionRequest.RolloutSpec")},
    "egodriver.DriveSessionRequest.DebugInfo": {"scene_id": (1, S)},
    "egodriver.DriveSessionRequest.RolloutSpec": {
        "vehicle": (1, MSG, "egodriver.DriveSessionRequest.RolloutSpec.VehicleDefinition")},
    "egodriver.DriveSessionRequest.RolloutSpec.VehicleDefinition": {
        "available_cameras": (3, MSG, f"{SENS}.AvailableCamerasReturn.AvailableCamera", R)},
    "egodriver.DriveSessionCloseRequest": {"session_uuid": (1, S)},
    "egodriver.RolloutCameraImage": {"session_uuid": (1, S),
                                     "camera_image": (3, MSG, "egodriver.RolloutCameraImage.CameraImage")},
    "egodriver.RolloutCameraImage.CameraImage": {"frame_start_us": (2, X64), "frame_end_us": (3, X64),
                                                 "image_bytes": (4, BY), "logical_id": (5, S)},
    "egodriver.RolloutEgoTrajectory": {"session_uuid": (1, S), "trajectory": (3, MSG, "common.Trajectory"),
                                       "dynamic_states": (5, MSG, "common.DynamicState", R)},
    "egodriver.RouteRequest": {"session_uuid": (1, S), "route": (3, MSG, "egodriver.Route")},
    "egodriver.GroundTruthRequest": {"session_uuid": (1, S), "ground_truth": (2, MSG, "egodriver.GroundTruth")},
    "egodriver.DriveRequest": {"session_uuid": (1, S), "time_now_us": (3, X64), "time_query_us": (4, X64),
                               "renderer_data": (5, BY)},
    "egodriver.DriveResponse": {"trajectory": (2, MSG, "common.Trajectory"),
                                "debug_info": (3, MSG, "egodriver.DriveResponse.DebugInfo"),
                                "terminate_session": (4, B)},
    "egodriver.DriveResponse.DebugInfo": {"unstructured_debug_info": (1, BY),
                                          "sampled_trajectories": (2, MSG, "common.Trajectory", R)},
    "RolloutSpec": {"scenario_id": (1, S), "nr_rollouts": (2, U), "session_uuids": (3, S, None, R),
                    "start_time_offset_us": (4, X64), "random_seed": (5, X64)},
    "SimulationRequest": {"available_drivers": (1, MSG, "SimulationRequest.DriverAddress", R),
                          "rollout_specs": (2, MSG, "RolloutSpec", R), "n_concurrent_per_driver": (3, U)},
    "SimulationRequest.DriverAddress": {"ip": (1, S), "port": (2, U)},
    "ScenePrefetchRequest": {"scene_id": (1, S)},
    "SceneMetadata": {"version_string": (1, S), "training_date": (2, S), "dataset_hash": (3, S), "uuid": (4, S),
                      "camera_ids": (5, S, None, R), "lidar_ids": (6, S, None, R), "start_time_us": (7, X64),
                      "end_time_us": (8, X64)},
    "SceneInfo": {"scene_id": (1, S), "provider_kind": (2, S), "metadata": (3, MSG, "SceneMetadata")},
    "ServiceCapacity": {"service_name": (1, S), "total_capacity": (2, U), "skipped": (3, B)},
    "RuntimeInfo": {"max_supported_concurrent_rollouts": (1, U), "nr_workers": (2, U), "renderer_type": (3, S),
                    "scenes": (4, MSG, "SceneInfo", R), "service_capacities": (5, MSG, "ServiceCapacity", R),
                    **{n: (i, MSG, "common.VersionId") for i, n in enumerate(
                        ("runtime_version", "nre_version", "physics_version", "driver_version", "traffic_version",
                         "video_model_version"), start=6)}},
    "SimulationReturn": {**{n: (i, MSG, "common.VersionId") for i, n in enumerate(
                             ("runtime_version", "nre_version", "physics_version", "driver_version",
                              "traffic_version"), start=1)},
                         "rollout_returns": (6, MSG, "SimulationReturn.RolloutReturn", R),
                         "video_model_version": (7, MSG, "common.VersionId")},
    "SimulationReturn.RolloutReturn": {
        "rollout_spec": (1, MSG, "RolloutSpec"), "success": (2, B), "rollout_uuid": (3, S), "error": (4, S),
        "timestep_metrics": (5, MSG, "SimulationReturn.TimestepMetric", R),
        "aggregated_metrics": (6, MSG, "SimulationReturn.RolloutReturn.AggregatedMetricsEntry", R),
        "error_code": (7, ENUM, "RolloutErrorCode")},
    "SimulationReturn.TimestepMetric": {"name": (1, S), "timestamps_us": (2, X64, None, R),
                                        "values": (3, D, None, R), "valid": (4, B, None, R),
                                        "time_aggregation": (5, ENUM, "TimeAggregation")},
    f"{SENS}.AvailableCamerasReturn.AvailableCamera": {
        "intrinsics": (1, MSG, f"{SENS}.CameraSpec"), "rig_to_camera": (2, MSG, "common.Pose"), "logical_id": (3, S)},
    f"{SENS}.CameraSpec": {
        "temporary_camera_spec": (1, S), "ftheta_param": (2, MSG, f"{SENS}.FthetaCameraParam"),
        "opencv_pinhole_param": (3, MSG, f"{SENS}.OpenCVPinholeCameraParam"),
        "opencv_fisheye_param": (4, MSG, f"{SENS}.OpenCVFisheyeCameraParam"), "logical_id": (5, S),
        "resolution_h": (7, U), "resolution_w": (8, U), "shutter_type": (9, ENUM, f"{SENS}.ShutterType"),
        "bivariate_windshield_model_param": (10, MSG, f"{SENS}.BivariateWindshieldModelParameters")},
    f"{SENS}.OpenCVPinholeCameraParam": {
        "principal_point_x": (1, D), "principal_point_y": (2, D), "focal_length_x": (3, D), "focal_length_y": (4, D),
        "radial_coeffs": (5, D, None, R), "tangential_coeffs": (6, D, None, R), "thin_prism_coeffs": (7, D, None, R)},
    f"{SENS}.OpenCVFisheyeCameraParam": {
        "principal_point_x": (1, D), "principal_point_y": (2, D), "focal_length_x": (3, D), "focal_length_y": (4, D),
        "radial_coeffs": (5, D, None, R), "max_angle": (6, D)},
    f"{SENS}.FthetaCameraParam": {
        "principal_point_x": (1, D), "principal_point_y": (2, D),
        "reference_poly": (3, ENUM, f"{SENS}.FthetaCameraParam.PolynomialType"),
        "pixeldist_to_angle_poly": (4, D, None, R), "angle_to_pixeldist_poly": (5, D, None, R), "max_angle": (6, D),
        "linear_cde": (7, MSG, f"{SENS}.FthetaCameraParam.LinearCde")},
    f"{SENS}.FthetaCameraParam.LinearCde": {"linear_c": (1, D), "linear_d": (2, D), "linear_e": (3, D)},
    f"{SENS}.BivariateWindshieldModelParameters": {
        "reference_poly": (1, ENUM, None), "horizontal_poly": (2, D, None, R), "vertical_poly": (3, D, None, R),
        "horizontal_poly_inverse": (4, D, None, R), "vertical_poly_inverse": (5, D, None, R)},
}


@pytest.mark.parametrize("full_name", sorted(SPEC))
def test_fields_match_the_spec(full_name):
    desc = m.POOL.FindMessageTypeByName(full_name)
    expected = SPEC[full_name]
    assert sorted(f.name for f in desc.fields) == sorted(expected), full_name
    for name, (number, ftype, *rest) in expected.items():
        f = desc.fields_by_name[name]
        assert (f.number, f.type) == (number, ftype), f"{full_name}.{name}"
        type_name = rest[0] if rest else None
        if type_name and ftype == MSG:
            assert f.message_type.full_name == type_name, f"{full_name}.{name}"
        if type_name and ftype == ENUM:
            assert f.enum_type.full_name == type_name, f"{full_name}.{name}"
        repeated = bool(rest[1:]) and rest[1] == R
        assert f.is_repeated == repeated, f"{full_name}.{name} repeated"


def test_enums_match_the_spec():
    def values(full_name: str) -> dict[str, int]:
        return {v.name: v.number for v in m.POOL.FindEnumTypeByName(full_name).values}

    assert values("TimeAggregation") == {f"TIME_AGGREGATION_{n}": i for i, n in enumerate(
        ("UNSPECIFIED", "MEAN", "MEDIAN", "MAX", "MIN", "LAST"))}
    assert values("RolloutErrorCode") == {"ROLLOUT_ERROR_CODE_NONE": 0, "ROLLOUT_ERROR_CODE_UNSPECIFIED": 1,
                                          "ROLLOUT_ERROR_CODE_INVALID_SCENE": 2}
    assert values(f"{SENS}.ShutterType") == {"UNKNOWN": 0, "ROLLING_TOP_TO_BOTTOM": 1, "ROLLING_LEFT_TO_RIGHT": 2,
                                             "ROLLING_BOTTOM_TO_TOP": 3, "ROLLING_RIGHT_TO_LEFT": 4, "GLOBAL": 5}
    assert values(f"{SENS}.FthetaCameraParam.PolynomialType") == {
        "UNKNOWN": 0, "PIXELDIST_TO_ANGLE": 1, "ANGLE_TO_PIXELDIST": 2}
    assert sorted(values(f"{SENS}.BivariateWindshieldModelParameters.ReferencePoly").values()) == [0, 1]
    # our metrics enum uses the same numbers
    from alpagym_ray.metrics import Aggregation

    assert {a.name: int(a) for a in Aggregation} == {k.removeprefix("TIME_AGGREGATION_"): v
                                                      for k, v in values("TimeAggregation").items()}


def test_rpc_paths_and_types():
    ego = {n: (r.path, r.request.DESCRIPTOR.full_name, r.response.DESCRIPTOR.full_name)
           for n, r in m.EGODRIVER_RPCS.items()}
    P = "/egodriver.EgodriverService/"
    assert ego == {
        "start_session": (P + "start_session", "egodriver.DriveSessionRequest", "common.SessionRequestStatus"),
        "close_session": (P + "close_session", "egodriver.DriveSessionCloseRequest", "common.Empty"),
        "submit_image_observation": (P + "submit_image_observation", "egodriver.RolloutCameraImage", "common.Empty"),
        "submit_egomotion_observation": (P + "submit_egomotion_observation", "egodriver.RolloutEgoTrajectory",
                                         "common.Empty"),
        "submit_route": (P + "submit_route", "egodriver.RouteRequest", "common.Empty"),
        "submit_recording_ground_truth": (P + "submit_recording_ground_truth", "egodriver.GroundTruthRequest",
                                          "common.Empty"),
        "drive": (P + "drive", "egodriver.DriveRequest", "egodriver.DriveResponse"),
        "get_version": (P + "get_version", "common.Empty", "common.VersionId"),
        "shut_down": (P + "shut_down", "common.Empty", "common.Empty"),
    }
    rt = {n: (r.path, r.request.DESCRIPTOR.full_name, r.response.DESCRIPTOR.full_name)
          for n, r in m.RUNTIME_RPCS.items()}
    assert rt == {
        "simulate": ("/RuntimeService/simulate", "SimulationRequest", "SimulationReturn"),
        "prefetch_scene": ("/RuntimeService/prefetch_scene", "ScenePrefetchRequest", "common.Empty"),
        "get_runtime_info": ("/RuntimeService/get_runtime_info", "common.Empty", "RuntimeInfo"),
        "shut_down": ("/RuntimeService/shut_down", "common.Empty", "common.Empty"),
    }


def test_optional_debug_info_has_presence():
    req = m.DriveSessionRequest(session_uuid="s")
    assert not req.HasField("debug_info")
    req.debug_info.scene_id = ""
    assert req.HasField("debug_info")
    assert req.SerializeToString() == ld(1, b"s") + ld(4, b"")


# ---- private pool and generated code ---------------------------------------------------------------
def test_classes_live_in_a_private_pool():
    assert m.Vec3.DESCRIPTOR.file.pool is m.POOL
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("egodriver.DriveRequest")


def test_coexists_with_another_common_package_in_the_default_pool():
    """An installed alpasim_grpc puts `common.Vec3` (etc.) in the default pool; ours must still load."""
    code = """
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
fdp = descriptor_pb2.FileDescriptorProto(name="alpasim_grpc/v0/common.proto", package="common", syntax="proto3")
msg = fdp.message_type.add(name="Vec3")
for i, n in enumerate("xyz", 1):
    msg.field.add(name=n, number=i, type=descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
theirs = message_factory.GetMessageClass(descriptor_pool.Default().Add(fdp).message_types_by_name["Vec3"])
from envs.alpasim import messages as m
a = theirs(x=1.0, y=2.0).SerializeToString()
b = m.Vec3(x=1.0, y=2.0).SerializeToString()
assert a == b, (a, b)
assert m.Vec3.FromString(a).y == 2.0
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_generated_descriptors_are_current():
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("gen_alpasim_proto", REPO / "scripts" / "gen_alpasim_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render(gen.compile_protos())
    assert gen.OUTPUT.read_text() == text, "run scripts/gen_alpasim_proto.py"


def test_generated_descriptors_come_from_the_proto_files():
    from google.protobuf import descriptor_pb2

    from envs.alpasim.protocol.generated.descriptors import FILES

    names = [name for name, _ in FILES]
    assert names == ["common.proto", "sensorsim.proto", "egodriver.proto", "runtime.proto"]
    packages = {name: descriptor_pb2.FileDescriptorProto.FromString(data).package for name, data in FILES}
    assert packages == {"common.proto": "common", "sensorsim.proto": SENS, "egodriver.proto": "egodriver",
                        "runtime.proto": ""}
    for name in names:
        assert (REPO / "envs" / "alpasim" / "protocol" / name).is_file()


# ---- the generic handler ----------------------------------------------------------------------------
class _Echo:
    def get_version(self, request, context):
        return m.version_id("echo")


@pytest.fixture()
def echo_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=m.server_options(4096))
    server.add_generic_rpc_handlers((m.service_handler(m.EGODRIVER_RPCS, _Echo()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=m.channel_options(1 << 20))
    yield channel
    channel.close()
    server.stop(None)


def test_service_handler_statuses(echo_server):
    stub = m.egodriver_stub(echo_server)
    v = stub.get_version(m.Empty(), timeout=10)
    assert v.version_id == "echo" and v.grpc_api_version.minor == 54
    # an rpc the implementation lacks
    with pytest.raises(grpc.RpcError) as e:
        stub.drive(m.DriveRequest(session_uuid="x"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert m.is_unimplemented(e.value)
    # bytes that are no Empty message: field 1 claims 5 bytes and the stream ends
    raw = echo_server.unary_unary("/egodriver.EgodriverService/get_version")
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\x05ab", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "get_version" in e.value.details() and "common.Empty" in e.value.details()
    # over the server's 4 KiB limit
    with pytest.raises(grpc.RpcError) as e:
        raw(ld(99, b"x" * 8000), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # still serving
    assert stub.get_version(m.Empty(), timeout=10).version_id == "echo"


def test_service_handler_rejects_an_empty_implementation():
    with pytest.raises(ValueError, match="implements none"):
        m.service_handler(m.RUNTIME_RPCS, object())


def test_grpc_target():
    assert m.grpc_target("127.0.0.1", 5) == "127.0.0.1:5"
    assert m.grpc_target("::1", 5) == "[::1]:5"
    with pytest.raises(ValueError):
        m.grpc_target("h", 0)
