#!/usr/bin/env bash
# The Python packages the GPU checks need that the accelerator machine lacks (TRL 1.12, gguf, and datasets with its
# dill and multiprocess), downloaded here as wheels for its Python 3.12 into .whl/ (ignored by git):
#
#     bash benchmarks/gpu_wheels.sh
#
# The device call carries .whl and installs it before the benchmark (benchmarks/gpu_check.sh bench does both).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in "trl==1.12.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "gguf==0.19.0"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$spec"
done
ls -la .whl
