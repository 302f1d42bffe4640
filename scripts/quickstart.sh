#!/usr/bin/env bash
# scripts/quickstart.sh - the README's first command: installs what is
# missing, builds, and runs the main job.
#
# Until the daemon and the bundled default model exist, the main job is the
# offline tool vlm-run answering a question about a test image with the
# small LLaVA-style golden model in tests/data (random weights: the answer
# is gibberish, but it is exactly what llama.cpp answers for the same files).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build -Dbuildtype=release
ninja -C build
case_dir=tests/data/golden/micro-f32
set -x
./build/clients/vlm-run -m "$case_dir/text.gguf" --mmproj "$case_dir/mmproj.gguf" \
  --image "$case_dir/exact.png" --preprocess llamacpp --temp 0 -n 24 \
  -p "describe the image in detail."
