#!/usr/bin/env bash
# Run the device package on ARM64 under emulation (qemu-user), for correctness, not timing: Debian's arm64
# Python 3.11, the aarch64 wheels pip picks for a Raspberry Pi or Jetson, and `kdctl profile` + `kdctl gate` of an
# export bundle. Needs root (apt) and the package registries; nothing else is fetched.
#
#   deploy/emulate-aarch64.sh runs/export/quickstart-cpu [workdir]
set -euo pipefail
BUNDLE="$(realpath "${1:?usage: deploy/emulate-aarch64.sh EXPORT_BUNDLE [WORKDIR]}")"
WORK="$(realpath -m "${2:-${TMPDIR:-/tmp}/kdctl-aarch64}")"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

if ! command -v qemu-aarch64-static >/dev/null; then
  dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi
mkdir -p "$WORK/debs" "$WORK/root"
if [ ! -x "$WORK/root/usr/bin/python3.11" ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
  (cd "$WORK/debs" && apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
     libpython3.11-stdlib:arm64 libc6:arm64 libssl3:arm64 libffi8:arm64 zlib1g:arm64 libexpat1:arm64 \
     libbz2-1.0:arm64 liblzma5:arm64 libgcc-s1:arm64 libstdc++6:arm64 libsqlite3-0:arm64 libncursesw6:arm64 \
     libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 libcrypt1:arm64 libgomp1:arm64 2>/dev/null)
  for d in "$WORK"/debs/*.deb; do dpkg -x "$d" "$WORK/root"; done
fi
rm -rf "$WORK/dist" "$WORK/site" "$WORK/src"
mkdir -p "$WORK/src"  # build from a copy: the checkout gets no build/ or egg-info
tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./build -cf - . | tar -C "$WORK/src" -xf -
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/kdctl-*.whl)"
"$PY" -m pip install -q --target "$WORK/site" --python-version 3.11 --implementation cp --only-binary=:all: \
  --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
  "${WHEEL}[onnxruntime]" "onnxruntime==${ORT_VERSION:-1.20.1}"  # newer aarch64 wheels crash qemu 7.2, not devices
if ls "$WORK/site" | grep -qiE '^(torch|ultralytics|openvino)'; then echo "training packages leaked in" >&2; exit 1; fi

run() { PYTHONPATH="$WORK/site" qemu-aarch64-static -L "$WORK/root" "$WORK/root/usr/bin/python3.11" "$@"; }
rm -rf "$WORK/bundle" "$WORK/profile" "$WORK/gate"
cp -r "$BUNDLE" "$WORK/bundle"
# every emulated interpreter start costs seconds: profile verifies the export bundle it reads (hashes, manifest),
# gate the profile bundle written here, so neither needs a `kdctl bundle verify` run of its own
run -m kdctl.cli.main profile "$WORK/bundle" --runs 5 --warmup 1 --threads 2 --out "$WORK/profile" --json > "$WORK/profile.json"
# latency under emulation means nothing: gate on accuracy and size only
run -m kdctl.cli.main gate "$WORK/profile" --min-map 0 --max-p90-ms 1000000 --out "$WORK/gate"
# the same input through every ONNX artifact on both machines: outputs must agree
VENV_PY="${HOST_PYTHON:-$PY}"
"$VENV_PY" - "$WORK" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort
work = Path(sys.argv[1])
m = json.loads((work / "bundle" / "manifest.json").read_text())
imgsz = int(m["metrics"]["imgsz"])
try:  # a real validation image when the dataset is on this machine: confident boxes to compare
    from kdctl.data.resolve import load_yolo_yaml
    from kdctl.export.stage import _preprocess
    x = _preprocess(load_yolo_yaml(m["inputs"]["data"]["yaml"], splits=("val",)).val_images[:1], imgsz)[0]
except Exception:
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
np.save(work / "x.npy", x)
for a in m["metrics"]["artifacts"]:
    if a["format"] == "onnx":
        s = ort.InferenceSession(str(work / "bundle" / a["files"][0]), providers=["CPUExecutionProvider"])
        np.save(work / f"x86-{a['name']}.npy", s.run(None, {s.get_inputs()[0].name: np.load(work / "x.npy")})[0])
PY
run - "$WORK" <<'PY'
import json, platform, sys
from pathlib import Path
import numpy as np
import onnxruntime as ort
print("python", platform.python_version(), platform.machine(), "onnxruntime", ort.__version__)
work = Path(sys.argv[1])
for a in json.loads((work / "bundle" / "manifest.json").read_text())["metrics"]["artifacts"]:
    if a["format"] == "onnx":
        s = ort.InferenceSession(str(work / "bundle" / a["files"][0]), providers=["CPUExecutionProvider"])
        np.save(work / f"a64-{a['name']}.npy", s.run(None, {s.get_inputs()[0].name: np.load(work / "x.npy")})[0])
PY
"$VENV_PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
import numpy as np
work, bad = Path(sys.argv[1]), []
for ref in sorted(work.glob("x86-*.npy")):
    name = ref.name[4:-4]
    a, b = np.load(ref)[0], np.load(work / f"a64-{name}.npy")[0]       # (4 + nc, anchors)
    scores = np.abs(a[4:] - b[4:]).max()
    keep = a[4:].max(0) > 0.25                                           # anchors that become detections
    boxes = np.abs(a[:4, keep] - b[:4, keep]).max() if keep.any() else 0.0
    # INT8 kernels round differently on ARM and x86; FP32 must agree to float precision
    ok = boxes <= (2.0 if "int8" in name else 0.05) and scores <= (0.05 if "int8" in name else 1e-3)
    print(f"{name}: aarch64 vs x86 on {int(keep.sum())} confident anchors max |box| {boxes:.2e} px, "
          f"all anchors max |score| {scores:.2e} -> {'ok' if ok else 'DIFFERENT'}")
    bad += [] if ok else [name]
sys.exit(1 if bad else 0)
PY
echo "aarch64 (emulated): profile, verify, gate and outputs OK"
