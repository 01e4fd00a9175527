#!/usr/bin/env bash
# Install or locate perf_analyzer. On success prints its path (a wrapper at $VENV/bin/perf_analyzer, or one
# already on PATH) and exits 0; on failure its last line on stderr says what failed, it exits 1 and leaves no
# perf_analyzer that does not run. Idempotent: a working install is kept, anything else is redone.
#   bash perf/install_perf_analyzer.sh [VENV]     (default .venv)
# glibc >= 2.38: the perf-analyzer wheel. Older (Debian 12): the binary inside the tritonclient 2.44.0
# wheel, with Debian's libb64-0d and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel (no GPU
# needed). Inside NGC's -py3-sdk image perf_analyzer is already on PATH.
set -euo pipefail
VENV=${1:-.venv}
wrapper="$VENV/bin/perf_analyzer"
dest="$VENV/opt/perf_analyzer"
staging="$dest.new"
tmp=""
trap 'rm -rf "$staging" ${tmp:+"$tmp"}' EXIT

fail() { echo "install_perf_analyzer: $*" >&2; exit 1; }
runs() {  # starts and reports its version (an empty or truncated file would "run" and say nothing)
  local out
  out=$("$1" --version 2>&1) || return 1
  case "${out,,}" in *version*) return 0 ;; *) return 1 ;; esac
}
why_not() { { "$1" --version 2>&1 || true; } | awk 'NF {line = $0} END {print (line == "" ? "no version output" : line)}'; }

if [ -x "$wrapper" ] && runs "$wrapper"; then echo "$wrapper"; exit 0; fi
if found=$(command -v perf_analyzer) && runs "$found"; then echo "$found"; exit 0; fi
[ -x "$VENV/bin/pip" ] && [ -x "$VENV/bin/python" ] || fail "no virtual environment at $VENV (make install creates it)"
rm -f "$wrapper"  # there but not running: redo it

# awk reads its whole input: no SIGPIPE for the writer under pipefail (head would cause exit 141).
glibc=$(ldd --version 2>&1 | awk 'NR == 1 {print $NF}')
if [ "$(printf '%s\n2.38\n' "$glibc" | sort -V | awk 'NR == 1')" = "2.38" ]; then
  "$VENV/bin/pip" uninstall -y -q perf-analyzer >/dev/null 2>&1 || true  # a copy that did not run
  "$VENV/bin/pip" install -q perf-analyzer >&2 || fail "pip install perf-analyzer failed (offline?)"
  if ! runs "$wrapper"; then
    reason=$(why_not "$wrapper")
    "$VENV/bin/pip" uninstall -y -q perf-analyzer >/dev/null 2>&1 || true
    fail "the perf-analyzer wheel's perf_analyzer does not run: $reason"
  fi
  echo "$wrapper"; exit 0
fi

has_libb64() { PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | awk '/libb64\.so\.0d/ {found = 1} END {exit !found}'; }
if ! has_libb64; then
  [ "$(id -u)" = 0 ] || fail "perf_analyzer needs libb64: sudo apt-get install -y libb64-0d, then rerun"
  { apt-get update -qq && apt-get install -y -qq libb64-0d; } >&2 || fail "apt-get install libb64-0d failed"
  has_libb64 || fail "libb64.so.0d is still not found after apt-get install libb64-0d"
fi

tmp=$(mktemp -d)
# Not installed into the venv: tritonclient 2.44 conflicts with nvidia-pytriton's pin.
"$VENV/bin/pip" download -q --no-deps -d "$tmp" tritonclient==2.44.0 nvidia-cuda-runtime-cu12==12.9.79 >&2 ||
  fail "pip download of tritonclient==2.44.0 and nvidia-cuda-runtime-cu12==12.9.79 failed (offline?)"
rm -rf "$staging"
mkdir -p "$staging"
# Python's zipfile rather than unzip, which minimal Debian images lack.
"$VENV/bin/python" - "$tmp" "$staging" <<'PY' || fail "could not extract perf_analyzer and libcudart.so.12 from the wheels"
import glob, os, shutil, sys, zipfile

tmp, out = sys.argv[1:]
for pattern, member in (("tritonclient-2.44.0-*.whl", "tritonclient-2.44.0.data/data/bin/perf_analyzer"),
                        ("nvidia_cuda_runtime_cu12-*.whl", "nvidia/cuda_runtime/lib/libcudart.so.12")):
    (wheel,) = glob.glob(os.path.join(tmp, pattern))
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(os.path.join(out, os.path.basename(member)), "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
chmod +x "$staging/perf_analyzer"
LD_LIBRARY_PATH="$staging" runs "$staging/perf_analyzer" ||
  fail "perf_analyzer does not run: $(LD_LIBRARY_PATH="$staging" why_not "$staging/perf_analyzer")"
rm -rf "$dest"
mv "$staging" "$dest"
cat > "$wrapper.tmp" <<WRAP
#!/usr/bin/env bash
here=\$(cd "\$(dirname "\$0")/../opt/perf_analyzer" && pwd)
LD_LIBRARY_PATH="\$here\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/perf_analyzer" "\$@"
WRAP
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
runs "$wrapper" || { rm -f "$wrapper"; fail "the perf_analyzer wrapper $wrapper does not run"; }
echo "$wrapper"
