#!/usr/bin/env bash
# The long fuzz run of one target: tests/fuzz/run.sh TARGET [SECONDS] (default 600). The work
# corpus and findings go under ${FUZZ_OUT:-/tmp/gally-fuzz}/TARGET; the last lines printed are
# libFuzzer's figures (executions, coverage) and the findings.
set -euo pipefail
target=$1
seconds=${2:-600}
out=${FUZZ_OUT:-/tmp/gally-fuzz}/$target
mkdir -p "$out/corpus" "$out/findings"
cd "$(dirname "$0")/../.."
python tests/fuzz/fuzz.py "$target" "$out/corpus" "$out/findings" -max_total_time="$seconds" -timeout=10 \
  -rss_limit_mb=4096 -max_len=131072 -print_final_stats=1 -artifact_prefix="$out/crash-" 2>&1 | tee "$out/log" |
  grep -E "^FINDING|DONE|stat::number_of_executed_units|ERROR|SUMMARY" || true
ls "$out" | grep -E "^crash-" || true
