#!/usr/bin/env bash
# Runs the service for real and checks the dashboard and the rules against it
# (ctest: deploy_live_check). Starts a coordinator and a 2-rank CPU worker
# group ("tiny") on loopback, a real Prometheus (Debian's `prometheus`,
# loopback, 1 s scrape interval, static config) scraping the coordinator and
# both ranks while `denoised generate` runs a few requests, then runs every
# PromQL expression of deploy/grafana/denoised-dashboard.json and
# deploy/prometheus/rules.yaml through Prometheus' HTTP API, and compares the
# step-latency quantiles with the client's own step times. See
# deploy/live_check.py for the checks. Bounded (5 min); stops everything it
# started.
#
#   deploy/live-check.sh path/to/denoised [WORK_DIR]   (default build/deploy-live-check)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${1:?usage: deploy/live-check.sh path/to/denoised [WORK_DIR]}")
work=$(mkdir -p "${2:-$root/build/deploy-live-check}" && cd "${2:-$root/build/deploy-live-check}" && pwd)
for tool in prometheus promtool node npm python3; do
  command -v "$tool" >/dev/null || { echo "deploy/live-check.sh: $tool not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
[[ -x $bin ]] || { echo "deploy/live-check.sh: $bin is not executable" >&2; exit 1; }

# The expressions and the plain rule file come from validate.mjs (npm yaml).
node_dir=$work/node
# shellcheck source=validate/npm-setup.sh
source "$root/deploy/validate/npm-setup.sh"
dn_npm_setup "$root" "$node_dir" "$work/npm-cache"
(cd "$node_dir" && node validate.mjs rules "$root/deploy/prometheus/rules.yaml" "$work/rules.yaml" >/dev/null \
   && node validate.mjs exprs "$root/deploy/grafana/denoised-dashboard.json" \
        "$root/deploy/prometheus/rules.yaml" > "$work/exprs.jsonl")

exec timeout -k 10 300 python3 "$root/deploy/live_check.py" --bin "$bin" --work "$work" \
  --rules "$work/rules.yaml" --exprs "$work/exprs.jsonl"
