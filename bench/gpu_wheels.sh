#!/usr/bin/env bash
# The packages kdctl's training needs that a lent GPU machine's image lacks (it has torch, torchvision, onnx,
# onnxruntime, opencv, scipy, typer, rich), as CPython 3.12 x86-64 wheels in .whl/ (about 57 MB, git-ignored
# through .git/info/exclude), at the versions of this checkout's .venv. Then, in one device call:
#
#   run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#       --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
#       python3 bench/gpu_session.py --device 0 --jobs 16 --mps --deadline 450 --out $OUT")
#
# TensorRT is not in the image and its wheels (about 1 GB) are over what a call carries, so bench/tensorrt_gpu.py
# cannot run there.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
rm -rf .whl
plat=""
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat="$plat --platform $p"
done
# ultralytics reads results.csv with polars; kdctl's recipes are pydantic; its evaluator's reference is pycocotools
pkgs=""
for name in ultralytics ultralytics-thop pydantic pydantic_core annotated-types typing-inspection pycocotools \
            polars polars-runtime-32; do
  pkgs="$pkgs $name==$(ver "$name")"
done
# shellcheck disable=SC2086
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl $pkgs
du -sh .whl
