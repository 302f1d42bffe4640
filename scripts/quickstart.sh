#!/usr/bin/env bash
# scripts/quickstart.sh - the README's first command: installs what is
# missing, builds, and runs the main job:
#   1. starts vlmd on a model (a free loopback port),
#   2. captions a folder of images with `vlm caption`, printing each caption
#      beside its file name,
#   3. answers one question about one image with `vlm ask`,
#   4. stops the daemon cleanly (SIGTERM, exit 0).
#
# The model is the bundled default model in models/default/ when it exists.
# Until then (issue 5 trains it) it is the small LLaVA-style golden test
# model in tests/data/golden/micro-f32: random weights, so its answers are
# gibberish, but they are token for token what llama.cpp's llava-cli answers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
[ -f build/build.ninja ] || meson setup build -Dbuildtype=release >/dev/null
ninja -C build

if [ -f models/default/text.gguf ] && [ -f models/default/mmproj.gguf ]; then
  model=(); images=examples/images; question="How many shapes are there?"
  first_image=$(ls "$images"/* | head -n 1)
else
  d=tests/data/golden/micro-f32
  model=(-m "$d/text.gguf" --mmproj "$d/mmproj.gguf" --preprocess llamacpp)
  images=$d; question="describe the image in detail."; first_image=$d/exact.png
fi

log=$(mktemp)
pid=
cleanup() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; rm -f "$log"; }
trap cleanup EXIT
./build/daemon/vlmd "${model[@]}" --endpoint 'tcp://127.0.0.1:*' 2>"$log" &
pid=$!
for _ in $(seq 1 300); do
  grep -q "ready on" "$log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
cat "$log"
export VLM_ENDPOINT=$(sed -n 's/.*ready on \([^ ]*\).*/\1/p' "$log" | head -n 1)

echo "== vlm caption $images"
./build/clients/vlm caption "$images" --max-tokens 64 |
  /usr/bin/python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(r["path"] + ": " + str(r.get("caption", r.get("error"))).strip())'
echo "== vlm ask $first_image \"$question\""
./build/clients/vlm ask --max-tokens 24 "$first_image" "$question"
echo
kill -TERM "$pid"; status=0; wait "$pid" || status=$?; pid=
echo "vlmd stopped (exit $status)"
