#!/usr/bin/env bash
# Run on the CPU machine in the repo root: put the wheels the offline GPU machine needs
# into .whl/ (git-ignored, so pass it to the device as a carried path; see gpu_check.sh).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)  # .git/info/exclude (may not exist yet)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
# xformers' wheel is py39-none-manylinux_2_28, so it installs under the device's Python 3.12.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35
# ninja lets MAX_JOBS parallelise the device build (torch falls back to serial without it).
# pip does not widen --platform to older glibc tags, so name ninja's (manylinux2014) too.
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl ninja
