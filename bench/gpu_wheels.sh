#!/usr/bin/env bash
# Fill wheels/ (git-ignored) with what bench/gpu.sh installs on a GPU machine that has no registry: the packages
# the Ray-free benchmark imports and that machine's image lacks (it has torch, transformers, numpy, scipy,
# scikit-learn, pyyaml, msgpack, psutil, einops, ninja, py-cpuinfo). Never torch: the machine's CUDA build stays.
#
#   bench/gpu_wheels.sh                 # for CPython 3.12, manylinux x86_64 (the GPU image's python3)
#   PYTHON_VERSION=3.11 bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PIP="${PIP:-python -m pip}"
# Pinned to the versions xcm is tested with here; one version of each (two stop the whole install).
BINARY=(
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    hjson==3.1.0
)
DEEPSPEED=deepspeed==0.19.8  # published as a source archive only: built here into a pure-Python wheel, no ops

rm -rf wheels && mkdir -p wheels
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
$PIP download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" \
    "${platforms[@]}" -d wheels "${BINARY[@]}"
DS_BUILD_OPS=0 $PIP wheel --quiet --no-deps --no-build-isolation -w wheels "$DEEPSPEED"
ls -la wheels
du -sh wheels
