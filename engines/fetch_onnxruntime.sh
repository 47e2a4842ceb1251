#!/usr/bin/env bash
# Stage ONNX Runtime for building engines/ with its ONNX Runtime engine, into an ignored folder:
#   headers  <- Debian trixie's libonnxruntime-dev .deb (downloaded with apt-get and unpacked, not
#               installed: bookworm has no ONNX Runtime package, and a private apt state keeps the
#               machine's own sources untouched)
#   library  <- the PyPI `onnxruntime` wheel (from $PYTHON's installed onnxruntime, else pip download)
# The C API is backward compatible, so the older headers work with the wheel's newer library.
#
# Usage: engines/fetch_onnxruntime.sh [DEST]      (default: engines/.deps/onnxruntime)
#        PYTHON=.venv/bin/python engines/fetch_onnxruntime.sh
# Then:  cmake -DONNXRUNTIME_ROOT=DEST ...  (DEST at the default path is found without it)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/.deps/onnxruntime}"
PYTHON="${PYTHON:-python3}"
DEB_SUITE="${DYC_ORT_DEB_SUITE:-trixie}"

if [[ -f "$dest/include/onnxruntime/onnxruntime_c_api.h" && -e "$dest/lib/libonnxruntime.so" && "${FORCE:-0}" != 1 ]]; then
  echo "fetch_onnxruntime: already staged in $dest (FORCE=1 to redo)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest/include" "$dest/lib"

# ---- headers: Debian's libonnxruntime-dev, through apt with a private sources list and state ----
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/apt/sources" "$work/deb"
cat > "$work/apt/sources/ort.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $DEB_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/apt/sources"
          -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
          -o "Dir::State::Status=/dev/null" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
echo "fetch_onnxruntime: headers from Debian $DEB_SUITE libonnxruntime-dev"
apt-get "${apt_opts[@]}" -qq update
(cd "$work/deb" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)
dpkg-deb -x "$work"/deb/libonnxruntime-dev_*.deb "$work/deb/root"
rm -rf "$dest/include/onnxruntime"
cp -r "$work/deb/root/usr/include/onnxruntime" "$dest/include/onnxruntime"

# ---- library: the onnxruntime wheel's libonnxruntime.so.<version> ----
capi=""
if "$PYTHON" -c 'import onnxruntime' 2>/dev/null; then
  capi="$("$PYTHON" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
  echo "fetch_onnxruntime: library from the installed wheel in $capi"
else
  echo "fetch_onnxruntime: library from a downloaded onnxruntime wheel"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$work/wheel" onnxruntime
  (cd "$work/wheel" && "$PYTHON" -m zipfile -e onnxruntime-*.whl x)
  capi="$work/wheel/x/onnxruntime/capi"
fi
lib="$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)"
[[ -n "$lib" ]] || { echo "fetch_onnxruntime: no libonnxruntime.so.1.* in $capi" >&2; exit 1; }
rm -f "$dest"/lib/libonnxruntime.so*
cp "$lib" "$dest/lib/"
# the SONAME is libonnxruntime.so.1: the loader looks for that name, the linker for the bare one
ln -sf "$(basename "$lib")" "$dest/lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$dest/lib/libonnxruntime.so"
echo "fetch_onnxruntime: staged $(basename "$lib") + headers in $dest"
