#!/usr/bin/env bash
# CPU timings for regression tracking (docs/PERFORMANCE.md, "CPU"): `denoised demo` and a tiny
# `denoised run` on 1 and 2 ranks, each binary given run REPS times, interleaved so that load from
# anything else on the machine falls on all of them alike. Prints the median wall seconds per row.
# Usage: scripts/cpu_timings.sh [REPS] BINARY...   (e.g. an older build's bin/denoised beside build/bin/denoised)
set -euo pipefail
reps=3
if [[ ${1:-} =~ ^[0-9]+$ ]]; then reps=$1; shift; fi
[[ $# -gt 0 ]] || { echo "usage: $0 [REPS] BINARY..." >&2; exit 2; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
declare -A times
run() {  # run KEY CMD...
  local key=$1; shift
  local s e; s=$(date +%s.%N); "$@" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }; e=$(date +%s.%N)
  times[$key]+="$(awk -v a="$s" -v b="$e" 'BEGIN {printf "%.2f", b - a}') "
}
for ((i = 0; i < reps; ++i)); do
  for b in "$@"; do
    run "$b|demo" "$b" demo --out-dir "$work/demo"
    for r in 1 2; do
      run "$b|tiny r$r" "$b" run --preset tiny --frames 17 --height 128 --width 128 --steps 10 --seed 7 --ranks $r --out "$work/t.safetensors"
    done
  done
done
printf '%-60s %-8s %s\n' binary case "median s (all)"
for key in "${!times[@]}"; do
  med=$(echo "${times[$key]}" | tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '%-60s %-8s %s (%s)\n' "${key%%|*}" "${key#*|}" "$med" "${times[$key]}"
done | sort
