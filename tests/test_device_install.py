"""The device package: ``pip install kdctl[onnxruntime]`` into a fresh venv without PyTorch, on more than one
Python, then ``kdctl profile`` of a real export bundle. Needs PyPI (the registry is reachable here and in CI)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(version: str) -> str | None:
    """An interpreter of that version: on PATH, or installed by pyenv (whose shim refuses an inactive one)."""
    import os

    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}")] + sorted(str(p) for p in pyenv.glob(f"versions/{version}*/bin/python{version}"))
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "import venv, ensurepip"], capture_output=True).returncode == 0:
            return exe
    return None


def _pip_succeeded(r: subprocess.CompletedProcess) -> None:
    """A pip run passed; skip the test where the package registry cannot be reached."""
    if r.returncode != 0 and ("Could not find a version" in r.stderr or "Failed to establish" in r.stderr):
        pytest.skip(f"package registry unreachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def kdctl_wheel(tmp_path_factory) -> Path:
    """kdctl's wheel, built once from a clean copy of the checkout (its .venv and build folders stay out)."""
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(d / "dist"), str(src)],
                       capture_output=True, text=True, timeout=900)
    _pip_succeeded(r)
    (wheel,) = (d / "dist").glob("kdctl-*.whl")
    return wheel


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.device_install
@pytest.mark.parametrize("version", ["3.10", "3.12"])
def test_device_package_profiles_without_torch(tmp_path, export_cpu, kdctl_wheel, version, tiny_data):
    exe = _python(version)
    if exe is None:
        pytest.skip(f"no python{version} with venv on this machine")
    venv = tmp_path / "venv"
    subprocess.run([exe, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{kdctl_wheel}[onnxruntime]"], capture_output=True,
                       text=True, timeout=900)
    _pip_succeeded(r)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "onnxruntime" in names and not names & {"torch", "ultralytics", "torchvision", "openvino", "onnx"}
    bundle = tmp_path / "bundle"
    shutil.copytree(export_cpu, bundle)  # as copied onto a device: no training checkout around it
    out = tmp_path / "prof"
    r = subprocess.run([str(venv / "bin" / "kdctl"), "profile", str(bundle), "--runs", "5", "--warmup", "1",
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert {row["artifact"] for row in res["results"]} == {"onnx-fp32", "onnx-int8"}
    r = subprocess.run([str(venv / "bin" / "kdctl"), "bundle", "verify", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(venv / "bin" / "kdctl"), "gate", str(out), "--min-map", "0", "--out", str(tmp_path / "g")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # an artifact scored on the device, as a TensorRT engine built there is (its source bundle is not there: --data)
    r = subprocess.run([str(venv / "bin" / "kdctl"), "eval", str(bundle), "-a", "onnx-int8", "--data", str(tiny_data),
                        "--out", str(tmp_path / "e"), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = {a["name"]: a for a in json.loads((bundle / "manifest.json").read_text())["metrics"]["artifacts"]}
    assert json.loads(r.stdout)["map50_95"] == recorded["onnx-int8"]["metrics"]["map50_95"]


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.device_install
def test_device_package_on_emulated_aarch64(tmp_path, export_cpu):
    """Debian's arm64 Python under qemu-user, the aarch64 wheels a Pi or Jetson gets: profile, verify, gate, and the
    ONNX outputs against x86's on the same image (deploy/emulate-aarch64.sh)."""
    if shutil.which("qemu-aarch64-static") is None or shutil.which("apt-get") is None:
        pytest.skip("qemu-user-static is not installed (.ci/run installs it)")
    r = subprocess.run(["bash", str(ROOT / "deploy" / "emulate-aarch64.sh"), str(export_cpu), str(tmp_path / "a64")],
                       capture_output=True, text=True, timeout=1500, env={**__import__("os").environ,
                                                                          "HOST_PYTHON": sys.executable})
    if r.returncode != 0 and ("Failed to fetch" in r.stderr or "Could not find a version" in r.stderr):
        pytest.skip("package registries unreachable")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "python 3.11" in r.stdout and "aarch64" in r.stdout
    assert "onnx-int8: aarch64 vs x86" in r.stdout and "DIFFERENT" not in r.stdout
    assert "aarch64 (emulated): profile, verify, gate and outputs OK" in r.stdout
