#!/usr/bin/env bash
# Debian text corpora used by sift's built-in data. Root installs them; other users get them
# unpacked into $SIFT_CACHE/debian (found there by engine.data.corpora).
set -euo pipefail
PKGS=(fortunes wordnet-base)
if [[ -d /usr/share/games/fortunes && -f /usr/share/wordnet/data.noun ]]; then
  exit 0
fi
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PKGS[@]}" >/dev/null
  exit 0
fi
CACHE=${SIFT_CACHE:-$HOME/.cache/sift}/debian
mkdir -p "$CACHE/debs"
( cd "$CACHE/debs" && apt-get download "${PKGS[@]}" fortunes-min )
for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$CACHE/root"; done
echo "[setup] Debian corpora unpacked into $CACHE/root"
