#!/usr/bin/env bash
# The offline bundle for a GPU host that has Python and CUDA torch but nothing else and no package registry
# (the lent hosts: Ubuntu 24.04, Python 3.12): everything perf/gpu_suite.sh needs beyond torch, built here
# where a registry is reachable. The tree plus the bundle must travel within 64 MiB, so the packages go as
# one solid xz archive of an installed tree (wheels compress about half as well) and the large parts no
# benchmark imports are left out (transformers' other model families, test suites).
#   bash perf/gpu_bundle.sh [DEST]          (default .gpu-bundle/, about 60 MiB; PY_VERSION=3.12)
# On the GPU host: bash perf/gpu_suite.sh installs it (or: bash .gpu-bundle/install.sh).
# Versions: every package at the version this checkout's .venv has (the set the tests pass with), read
# with importlib.metadata; PY_VERSION picks the wheels' CPython (3.11 here builds one to try locally).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-bundle}
mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd)
PY_VERSION=${PY_VERSION:-3.12}
VENV_PY=${VENV_PY:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-64}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# What the benchmarks import on a host with torch and its own dependencies (filelock, fsspec, jinja2,
# networkx, setuptools, sympy, typing_extensions) and nothing else. Not here: onnx and onnxruntime (the GPU
# export is the torch runtime), scipy (the cascade's MILP controller; the suite fixes the gate threshold),
# hf-xet and the hub's command line (no hub on the host).
PACKAGES=(numpy diffusers transformers tokenizers huggingface_hub httpx2 httpcore2 anyio h11 idna certifi truststore
          safetensors regex pyyaml tqdm packaging requests urllib3 charset_normalizer importlib_metadata zipp
          lazy-importer pillow tritonclient grpcio protobuf python-rapidjson ml_dtypes aiohttp multidict yarl
          frozenlist aiosignal propcache aiohappyeyeballs attrs ftfy wcwidth setuptools matplotlib contourpy cycler
          kiwisolver pyparsing python-dateutil tzdata fonttools)
pins=$("$VENV_PY" - "${PACKAGES[@]}" <<'PY'
import importlib.metadata, sys
print(" ".join(f"{name}=={importlib.metadata.version(name)}" for name in sys.argv[1:]))
PY
)
platforms=(--platform manylinux_2_39_x86_64 --platform manylinux_2_38_x86_64 --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any)
target=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${platforms[@]}")
# perf_analyzer (the SLO comparison's load generator): its wheel needs glibc >= 2.38 (Ubuntu 24.04 has 2.39).
# shellcheck disable=SC2086
"$VENV_PY" -m pip download -q --no-deps "${target[@]}" -d "$TMP/wheels" $pins perf-analyzer==2.60.0 clip-anytorch==2.6.0
site="$TMP/site"
"$VENV_PY" -m pip install -q --no-deps --no-compile --target "$site" "${target[@]}" \
  $(ls "$TMP"/wheels/*.whl | grep -v clip_anytorch)
# CLIP's BPE vocabulary (the export's tokenizer) without the clip package, which needs torchvision.
mkdir -p "$site/clip"
"$VENV_PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('clip/bpe_simple_vocab_16e6.txt.gz', sys.argv[2])" \
  "$TMP"/wheels/clip_anytorch-*.whl "$site"
# Symbol tables and debug info of shared objects and executables: about 7 MiB of the archive. Only
# .symtab and debug sections go (--strip-unneeded); the dynamic symbols that loading resolves stay.
strip_elf() {
  command -v strip >/dev/null || { echo "warning: no strip (binutils): the bundle stays larger" >&2; return; }
  find "$1" -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) -print0 |
    while IFS= read -r -d '' f; do
      [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] && strip --strip-unneeded "$f" 2>/dev/null || true
    done
}
# Prune what no benchmark imports: console scripts (their shebangs name this machine's python), test
# suites, and the transformers model families nothing here imports (about 7 MiB of the archive).
rm -rf "$site/bin"
find "$site" -depth -type d \( -name __pycache__ -o -name tests \) -exec rm -rf {} +
# The model families kept are those imported (here, with the same versions) by what the benchmarks load:
# diffusers' models (its autoencoders import DINOv2, SigLIP and ViT-MAE at import), its SD pipeline, CLIP.
keep=$("$VENV_PY" - <<'PY' 2>/dev/null
import importlib, sys
for name in ("triffusion.export.build", "triffusion.orchestrator.sampling", "triffusion.orchestrator.clip",
             "diffusers.models", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"):
    importlib.import_module(name)
from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer  # noqa: F401
print(" ".join(sorted({n.split(".")[2] for n in sys.modules if n.startswith("transformers.models.") and n.count(".") >= 2})))
PY
)
case " $keep " in *" clip "*) ;; *) echo "error: could not list the transformers models to keep (got: $keep)" >&2; exit 1 ;; esac
for dir in "$site"/transformers/models/*/; do
  case " $keep " in *" $(basename "$dir") "*) ;; *) rm -rf "$dir" ;; esac
done
# matplotlib: the PNG plots of the SLO report use DejaVu Sans; the other fonts serve PDF, PS and TeX math.
fonts="$site/matplotlib/mpl-data/fonts"
rm -rf "$fonts/afm" "$fonts/pdfcorefonts" "$site/matplotlib/mpl-data/sample_data"
find "$fonts/ttf" -type f ! -name 'DejaVuSans.ttf' ! -name 'DejaVuSans-*.ttf' ! -name 'LastResort*' ! -name 'LICENSE*' -delete
# fontTools: matplotlib imports fontTools.agl and fontTools.misc; the subpackages subset fonts for PDF and PS.
find "$site/fontTools" -mindepth 1 -maxdepth 1 -type d ! -name misc -exec rm -rf {} +
strip_elf "$site"
rm -rf "$DEST/site" "$DEST/bin" "$DEST/site.txz" "$DEST/tritonserver.txz"
( cd "$site" && tar cf - . | xz -9 -T0 > "$DEST/site.txz" )

# The Triton server of the nvidia-pytriton wheel with the python backend stub for PY_VERSION only.
"$VENV_PY" -m pip download -q --no-deps -d "$TMP/pytriton" nvidia-pytriton==0.7.0
( cd "$TMP/pytriton" && unzip -q nvidia_pytriton-*.whl 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' \
    -x 'nvidia_pytriton.libs/libpython3-*' \
  && find pytriton/tritonserver/python_backend_stubs -mindepth 1 -maxdepth 1 ! -name "$PY_VERSION" -exec rm -rf {} + )
strip_elf "$TMP/pytriton"
( cd "$TMP/pytriton" && tar cf - pytriton nvidia_pytriton.libs | xz -9 -T0 > tritonserver.txz )
mv "$TMP/pytriton/tritonserver.txz" "$DEST/"

cat > "$DEST/install.sh" <<'IN'
#!/usr/bin/env bash
# Offline install on the GPU host, into the python3 that runs the suite (PYTHON, default python3): the
# packages are unpacked beside this script and put first on that interpreter's path by a .pth file in its
# site-packages (the Triton python backend stub embeds the same interpreter, and reads .pth files but not
# PYTHONPATH); the server goes to site/pytriton, where `triffusion serve` finds it; the project is
# installed editable (its Triton adapters stay in the tree). Idempotent; undo: rm the .pth file it names.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=${REPO:-$(cd "$here/.." && pwd)}
py=${PYTHON:-python3}
if [ ! -f "$here/site/.complete" ]; then
  rm -rf "$here/site" && mkdir -p "$here/site"
  tar xJf "$here/site.txz" -C "$here/site"
  tar xJf "$here/tritonserver.txz" -C "$here/site"
  touch "$here/site/.complete"
fi
purelib=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import sys; sys.path.insert(0, '$here/site')" > "$purelib/000-triffusion-gpu-bundle.pth"
mkdir -p "$here/bin"
printf '#!/usr/bin/env bash\nexec "%s/site/perf_analyzer/bin/perf_analyzer" "$@"\n' "$here" > "$here/bin/perf_analyzer"
chmod +x "$here/bin/perf_analyzer"
"$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e "$repo"
( cd "$repo" && "$py" -c "import triffusion.export.build, triffusion.server, perf.unet_serving" )
echo "installed: $here/site first on $py's path ($purelib/000-triffusion-gpu-bundle.pth); perf_analyzer in $here/bin"
IN
chmod +x "$DEST/install.sh"

bundle=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$(( (bundle + tree) / 1048576 ))
echo "$DEST: $((bundle / 1048576)) MiB; with the tracked tree $total MiB (limit $LIMIT_MIB MiB)"
[ "$total" -le "$LIMIT_MIB" ] || { echo "error: over the $LIMIT_MIB MiB that travel to the GPU host" >&2; exit 1; }
