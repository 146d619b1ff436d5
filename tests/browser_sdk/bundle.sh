#!/usr/bin/env bash
# Bundles OpenAI's browser SDK (@openai/agents-realtime, versions pinned by package-lock.json)
# into one script for tests/test_webrtc_browser.py: out/browser-sdk/agents-realtime.js.
# Everything it installs stays under out/browser-sdk (`make clean` removes it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../../out/browser-sdk"
mkdir -p "$out/build"
cp "$here/package.json" "$here/package-lock.json" "$here/entry.js" "$out/build/"
cd "$out/build"
npm ci --no-audit --no-fund --loglevel=error
./node_modules/.bin/esbuild entry.js --bundle --format=iife --platform=browser --target=chrome100 \
  --log-level=warning --outfile="$out/agents-realtime.tmp.js"
mv "$out/agents-realtime.tmp.js" "$out/agents-realtime.js" # never a half-written bundle
