#!/usr/bin/env bash
# Regenerates examples/audio/user.wav, the bundled input of the WAV-in / WAV-out path: a short
# English question synthesised with espeak-ng, converted by sox to Mimi's format (24 kHz, mono,
# 16-bit PCM), peak-normalised to -1 dBFS, with a little silence after it (a streaming model
# answers once the user stops). sox runs in repeatable mode (-R: fixed dither seed), so the
# same espeak-ng and sox versions give the same bytes.
#   tools/make_example_audio.sh [TEXT] [OUT]
# Needs: espeak-ng, sox (tools/install-deps.sh audio-tools).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
text=${1:-"Hello Moshi, can you tell me a short story about the sea?"}
out=${2:-$root/examples/audio/user.wav}
for tool in espeak-ng sox; do
  command -v "$tool" >/dev/null || { echo "make_example_audio: needs $tool (tools/install-deps.sh audio-tools)" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# en-us voice at 150 words per minute: clear, about 4 s for the default sentence.
espeak-ng -v en-us -s 150 -w "$tmp/speech.wav" "$text"
# rate -v: sox's very-high-quality resampler; gain -n -1: peak at -1 dBFS; pad: 0.5 s of
# silence after the question.
sox -R "$tmp/speech.wav" -r 24000 -c 1 -b 16 -e signed-integer "$tmp/user.wav" rate -v gain -n -1 pad 0 0.5
mkdir -p "$(dirname "$out")"
mv "$tmp/user.wav" "$out"
echo "wrote $out"
sox "$out" -n stat 2>&1 | grep -E "Length|Maximum amplitude|RMS +amplitude"
