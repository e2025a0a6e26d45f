"""The Jetson path without a Jetson: the Q/DQ model obeys TensorRT's rules, build_engine.sh picks the right
trtexec flags for TensorRT 8.6, 10.x and 11, tegrastats rails per board; the CUDA runner itself runs where a GPU is."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kdctl.export.quantize import tensorrt_qdq_problems
from kdctl.profile.power import parse_tegrastats_power


def test_jetson_int8_follows_tensorrt_explicit_quantization_rules(export_jetson):
    import json

    import onnx

    path = export_jetson / "model-int8.onnx"
    assert tensorrt_qdq_problems(path) == []
    m = onnx.load(str(path))
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 50  # really quantized, not an FP32 model passing the check trivially
    arts = {a["name"]: a for a in json.loads((export_jetson / "manifest.json").read_text())["metrics"]["artifacts"]}
    a = arts["onnx-int8"]
    assert a["settings"]["scheme"] == "tensorrt" and a["settings"]["bias"] == "float"
    assert a["parity"]["ok"] is not False and a["metrics"]["map50_95_drop"] < 0.05  # ORT runs it within budget


def test_cpu_int8_uses_onnxruntime_fast_form_which_tensorrt_refuses(export_cpu):
    """ORT's fast CPU form (uint8 activations with zero points, int32 biases) is what TensorRT refuses: the
    checker must see it, and the cpu preset must keep it (3x faster in ORT than the symmetric form)."""
    problems = "\n".join(tensorrt_qdq_problems(export_cpu / "model-int8.onnx"))
    assert "zero point is uint8, TensorRT takes int8 only" in problems
    assert "int32 DequantizeLinear (a quantized bias)" in problems


def test_scheme_follows_the_target():
    from kdctl.export.targets import load_target, onnx_int8_scheme

    assert onnx_int8_scheme(load_target("jetson"), ["onnx-int8"]) == "tensorrt"
    assert onnx_int8_scheme(load_target("cpu"), ["onnx-int8"]) == "onnxruntime"
    assert onnx_int8_scheme(load_target("cpu"), ["onnx-int8", "tensorrt-int8"]) == "tensorrt"


FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{v}] # trtexec $*"
if [ "$1" != "--help" ]; then echo "$*" >> "$(dirname "$0")/calls.txt"; fi
"""


@pytest.mark.parametrize("banner,typed", [("8601", False), ("100300", False), ("101200", True), ("110000", True)])
def test_build_engine_script_follows_the_device_tensorrt(tmp_path, banner, typed):
    from kdctl.export.targets import load_target
    from kdctl.export.tensorrt import write_device_package

    arts = {"onnx-fp32": "model-fp32.onnx", "onnx-fp16": "model-fp16.onnx", "onnx-int8": "model-int8.onnx"}
    write_device_package(tmp_path, arts, load_target("jetson"), 128, engines_built=False)
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC.format(v=banner))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    r = subprocess.run(["bash", str(tmp_path / "build_engine.sh")], env={**os.environ, "TRTEXEC": str(fake)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == 2
    if typed:
        assert calls[0].startswith("--onnx=model-fp16.onnx --saveEngine=model-fp16.engine --stronglyTyped")
        assert calls[1].startswith("--onnx=model-int8.onnx --saveEngine=model-int8.engine --stronglyTyped")
    else:
        assert calls[0].startswith("--onnx=model-fp32.onnx --saveEngine=model-fp16.engine --fp16")
        assert calls[1].startswith("--onnx=model-int8.onnx --saveEngine=model-int8.engine --int8 --fp16")
    assert not any("--fp16" in c or "--int8" in c for c in calls) if typed else True


def test_build_engine_script_stops_without_a_version(tmp_path):
    from kdctl.export.targets import load_target
    from kdctl.export.tensorrt import write_device_package

    write_device_package(tmp_path, {"onnx-int8": "model-int8.onnx"}, load_target("jetson"), 128, engines_built=False)
    fake = tmp_path / "trtexec"
    fake.write_text("#!/usr/bin/env bash\necho 'no banner'\n")
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(tmp_path / "build_engine.sh")], env={**os.environ, "TRTEXEC": str(fake)},
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cannot read the TensorRT version" in r.stderr
    r = subprocess.run(["bash", str(tmp_path / "build_engine.sh")], env={**os.environ, "TRTEXEC": "/nope/trtexec"},
                       capture_output=True, text=True)
    assert r.returncode == 1 and "trtexec not found" in r.stderr


@pytest.mark.parametrize("line,mw,rail", [
    ("RAM 2811/7620MB CPU [3%@729] VDD_IN 4903mW/4903mW VDD_CPU_GPU_CV 480mW/480mW VDD_SOC 1200mW/1200mW",
     4903.0, "VDD_IN"),                                                                       # Orin Nano / NX
    ("RAM 1/2MB POM_5V_IN 3032/3032 POM_5V_GPU 0/0", 3032.0, "POM_5V_IN"),                     # Nano, TX2
    ("RAM 3/64MB VDD_GPU_SOC 3572mW/3572mW VDD_CPU_CV 795mW/795mW VIN_SYS_5V0 3026mW/3026mW "
     "VDDQ_VDD2_1V8AO 402mW/402mW", 3572.0 + 795 + 3026 + 402, "AGX Orin"),                   # AGX Orin
    ("RAM 1/2MB GPU 0/0 CPU 311/311 SOC 1243/1243 CV 0/0 VDDRQ 155/155 SYS5V 1669/1669",
     311.0 + 1243 + 155 + 1669, "AGX Xavier"),                                                 # AGX Xavier
])
def test_tegrastats_rail_per_board(line, mw, rail):
    got = parse_tegrastats_power(line)
    assert got[0] == mw and got[1].startswith(rail)
    assert parse_tegrastats_power("RAM 1/2MB CPU [3%@729]") is None


@pytest.mark.tensorrt
def test_tensorrt_runner_times_like_trtexec(tmp_path, export_jetson):
    """Real engine on a real GPU: checked shapes, separate H2D / compute / D2H, CUDA graphs, memory from CUDA."""
    from kdctl.export.tensorrt import build_engine
    from kdctl.runtimes.tensorrt import tensorrt_status
    from kdctl.runtimes.tensorrt import TensorRTRunner

    ok, why = tensorrt_status()
    if not ok:
        pytest.skip(why)
    engine = tmp_path / "m.engine"
    build_engine(export_jetson / "model-int8.onnx", engine, "int8")
    for graph in (False, True):
        run = TensorRTRunner(engine, cuda_graph=graph)
        x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
        y = run(x)
        assert y.shape[0] == 1 and np.isfinite(y).all()
        assert run.last_ms["compute"] > 0 and run.last_ms["h2d"] > 0 and run.info["gpu_memory_mb"] > 0
        with pytest.raises(ValueError, match="batch 2 is outside"):
            run(np.concatenate([x, x]))
        run.close()
    (tmp_path / "bad.engine").write_bytes(b"not an engine")
    from kdctl.errors import CheckFailed

    with pytest.raises(CheckFailed, match="cannot load this engine"):
        TensorRTRunner(tmp_path / "bad.engine")


def test_operator_check_looks_inside_if_branches(tmp_path):
    """An operator TensorRT cannot import is found inside an ``If`` body too, not only at the top level."""
    import onnx
    from onnx import TensorProto, helper

    then = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="ok_relu")], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Det", ["m"], ["y2"], name="bad_det")], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["out"], name="branch", then_branch=then, else_branch=other)],
                          "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert tensorrt_qdq_problems(path) == ["bad_det: operator Det is not imported by onnx-tensorrt"]
