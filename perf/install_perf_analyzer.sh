#!/usr/bin/env bash
# Install or locate perf_analyzer; prints its path (a wrapper at $VENV/bin/perf_analyzer).
#   bash perf/install_perf_analyzer.sh [VENV]     (default .venv)
# glibc >= 2.38: the perf-analyzer wheel. Older (Debian 12): the binary inside the tritonclient 2.44.0
# wheel, with Debian's libb64-0d and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel (no GPU
# needed). Inside NGC's -py3-sdk image perf_analyzer is already on PATH.
set -euo pipefail
VENV=${1:-.venv}
wrapper="$VENV/bin/perf_analyzer"
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then echo "$wrapper"; exit 0; fi
# awk reads its whole input: no SIGPIPE for the writer under pipefail (head would cause exit 141).
glibc=$(ldd --version 2>&1 | awk 'NR == 1 {print $NF}')
if [ "$(printf '%s\n2.38\n' "$glibc" | sort -V | awk 'NR == 1')" = "2.38" ]; then
  "$VENV/bin/pip" install -q perf-analyzer >&2
  echo "$VENV/bin/perf_analyzer"; exit 0
fi
if ! ldconfig -p | awk '/libb64\.so\.0d/ {found = 1} END {exit !found}'; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libb64-0d) >&2
  else
    echo "perf_analyzer needs libb64: sudo apt-get install -y libb64-0d" >&2; exit 1
  fi
fi
dest="$VENV/opt/perf_analyzer"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# Not installed into the venv: tritonclient 2.44 conflicts with nvidia-pytriton's pin.
"$VENV/bin/pip" download -q --no-deps -d "$tmp" tritonclient==2.44.0 nvidia-cuda-runtime-cu12==12.9.79 >&2
mkdir -p "$dest"
unzip -q -o -j "$tmp"/tritonclient-2.44.0-*.whl 'tritonclient-2.44.0.data/data/bin/perf_analyzer' -d "$dest"
unzip -q -o -j "$tmp"/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$dest"
chmod +x "$dest/perf_analyzer"
cat > "$wrapper" <<WRAP
#!/usr/bin/env bash
here=\$(cd "\$(dirname "\$0")/../opt/perf_analyzer" && pwd)
LD_LIBRARY_PATH="\$here\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/perf_analyzer" "\$@"
WRAP
chmod +x "$wrapper"
"$wrapper" --version >/dev/null 2>&1 || "$wrapper" --help >/dev/null 2>&1 || { echo "perf_analyzer does not run" >&2; exit 1; }
echo "$wrapper"
