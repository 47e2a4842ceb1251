#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers from Debian trixie's libonnxruntime-dev (no
# install: apt-get download + dpkg -x) into build/ort-headers (ignored like all of build/), where
# CMake looks for them, for building plugins/onnxruntime on a Debian machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/lists/partial"
cat > "$TMP/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
O=(-oDir::Etc::SourceList="$TMP/trixie.sources" -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists="$TMP/lists")
apt-get "${O[@]}" update >/dev/null
(cd "$TMP" && apt-get "${O[@]}" download libonnxruntime-dev)
dpkg -x "$TMP"/libonnxruntime-dev_*.deb "$TMP/x"
DEST="$ROOT/build/ort-headers"
rm -rf "$DEST"
mkdir -p "$DEST"
cp -r "$TMP/x/usr/include/onnxruntime/." "$DEST/"
echo "ONNX Runtime headers in $DEST (cmake finds them there)"
