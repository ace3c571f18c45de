#!/usr/bin/env bash
# Validates every deployment artefact offline (ctest: deploy_validate):
#   1. kubectl kustomize renders each overlay of deploy/k8s;
#   2. each rendered object validates against the Kubernetes and
#      Prometheus-Operator schemas (npm kubernetes-models, AJV), passes the
#      project's own checks (validate.mjs), and a TypeScript `satisfies I<Kind>`
#      check (tsc) rejects unknown fields;
#      custom resources (LeaderWorkerSet, overlays/gpu-multinode) validate
#      against their CRD's published schema (deploy/validate/crds), with no
#      unknown fields;
#   3. every check above rejects a set of deliberately broken renderings,
#      each for the reason it is meant to (the LWS ones name their error);
#   3b. overlays/gpu-multinode's launch-worker.sh maps LWS's env to the
#      launcher's flags (run with a stand-in `denoised` that prints them);
#   4. promtool check rules + promtool test rules (deploy/prometheus);
#   5. the Grafana dashboard type-checks against @grafana/schema (tsc);
#   6. the Dockerfile lints (dockerfile-utils) and passes validate.mjs's
#      structural checks.
#
#   deploy/validate.sh [WORK_DIR]     (default: build/deploy-validate)
#
# npm packages come from deploy/validate/package-lock.json (`npm ci`, into
# WORK_DIR/node, reinstalled only when the lock file changes). Needs kubectl
# (with kustomize v5), node + npm, and promtool (Debian `prometheus`); all are
# installed by scripts/install-deps.sh except kubectl, which the build image has.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mkdir -p "${1:-$root/build/deploy-validate}" && cd "${1:-$root/build/deploy-validate}" && pwd)
node_dir=$work/node

fails=0
pass() { echo "PASS $*"; }
failed() { echo "FAIL $*" >&2; fails=$((fails + 1)); }
need() { command -v "$1" >/dev/null || { echo "deploy/validate.sh: $1 not found ($2)" >&2; exit 1; }; }
need kubectl "kubectl with kustomize v5 is needed to render deploy/k8s"
need node "apt-get install nodejs, or scripts/install-deps.sh"
need npm "apt-get install npm, or scripts/install-deps.sh"
need promtool "apt-get install prometheus, or scripts/install-deps.sh"

# --- npm packages ---------------------------------------------------------
# shellcheck source=validate/npm-setup.sh
source "$root/deploy/validate/npm-setup.sh"
dn_npm_setup "$root" "$node_dir" "$work/npm-cache"
rm -f "$node_dir"/gen/*.ts
v() { (cd "$node_dir" && node validate.mjs "$@"); }
tsc_file() {  # tsc on generated files (paths relative to $node_dir)
  (cd "$node_dir" && node_modules/.bin/tsc --noEmit --strict --target ES2022 --module nodenext \
     --moduleResolution nodenext --skipLibCheck "$@")
}
# mutants k8s|dashboard INPUT: every mutation must be rejected, by
# validate.mjs (REJECTED) or else by a tsc type error (TS2xxx) in its file.
mutants() {
  local kind=$1 input=$2 dir=gen/mutants-$1 line status name why tsc_out
  rm -rf "${node_dir:?}/$dir"
  local list
  list=$(v "$kind-mutants" "$input" "$dir") || { failed "$kind mutants: validate.mjs failed"; return; }
  tsc_out=""
  if compgen -G "$node_dir/$dir/*.ts" >/dev/null; then
    tsc_out=$(cd "$node_dir" && tsc_file "$dir"/*.ts 2>&1) || true
  fi
  while IFS=$'\t' read -r status name why; do
    if [[ $status == REJECTED ]]; then
      pass "rejected: $kind $name (${why:0:110})"
    elif [[ $status == WRONG ]]; then
      failed "$kind mutation $name: not rejected for its reason: $why"
    elif line=$(grep -m1 "^$dir/$name\.ts(.*error TS2" <<<"$tsc_out"); then
      pass "rejected: $kind $name (tsc: $(grep -o 'error TS2.*' <<<"$line" | cut -c1-100))"
    else
      failed "not rejected: $kind mutation $name"
    fi
  done <<<"$list"
  [[ $(wc -l <<<"$list") -ge 8 ]] || failed "$kind mutants: only $(wc -l <<<"$list") mutations ran"
  rm -rf "${node_dir:?}/$dir"
}

# --- 1-3. Kubernetes ------------------------------------------------------
# Render from a copy of deploy/, so the gpu overlay's git-ignored secret file
# can be stood in for without touching the source tree.
rm -rf "$work/src" "$work/rendered" && mkdir -p "$work/src" "$work/rendered"
cp -r "$root/deploy/k8s" "$root/deploy/prometheus" "$root/deploy/grafana" "$work/src/"
for dir in "$work"/src/k8s/overlays/*/; do
  if grep -q 'worker-secret.txt' "$dir/kustomization.yaml" && [[ ! -f $dir/worker-secret.txt ]]; then
    echo "validate-only-placeholder" > "$dir/worker-secret.txt"
  fi
done
echo "== kubernetes manifests ($(kubectl version --client 2>/dev/null | grep -i kustomize || echo kustomize))"
overlays=()
for dir in "$work"/src/k8s/overlays/*/; do
  o=$(basename "$dir")
  overlays+=("$o")
  if kubectl kustomize "$dir" > "$work/rendered/$o.yaml"; then
    pass "kustomize overlays/$o ($(grep -c '^kind:' "$work/rendered/$o.yaml") objects)"
  else
    failed "kustomize overlays/$o"
    continue
  fi
  if v k8s "gen/k8s-$o.ts" "$work/rendered/$o.yaml"; then pass "schemas + project checks: overlays/$o"
  else failed "schemas + project checks: overlays/$o"; fi
done
[[ ${#overlays[@]} -ge 3 ]] || failed "expected overlays cpu-demo, gpu and gpu-multinode, found: ${overlays[*]}"
if (cd "$node_dir" && node_modules/.bin/tsc -p tsconfig.json); then pass "tsc: no unknown fields in ${overlays[*]}"
else failed "tsc: unknown fields (see above)"; fi

# The mutations below prove the checks can fail; they mean something only
# when the unmutated rendering passed every check.
echo "== the checks reject broken manifests"
if [[ $fails -eq 0 ]]; then
  mutants k8s "$work/rendered/gpu.yaml"
  mutants lws "$work/rendered/gpu-multinode.yaml"
else
  failed "skipping the manifest mutations: the real manifests failed"
fi

# --- 3b. the multi-node entrypoint ----------------------------------------
# launch-worker.sh as the pods run it: LWS's env in, the launcher's flags out.
# A stand-in `denoised` on PATH prints its arguments one per line (the script
# under test is the shell, not the binary).
echo "== overlays/gpu-multinode/launch-worker.sh"
launch_dir=$work/launch && rm -rf "$launch_dir" && mkdir -p "$launch_dir/bin"
printf '#!/bin/sh\nprintf "%%s\\n" "$@"\n' > "$launch_dir/bin/denoised" && chmod +x "$launch_dir/bin/denoised"
launch() {  # launch VAR=VALUE... : runs the script in a clean env, prints stdout+stderr
  env -i PATH="$launch_dir/bin:/usr/bin:/bin" DN_RANKS=8 DN_COORDINATOR=denoised-coordinator:50052 \
    DN_MODEL_ARG=--model=/models/Wan2.1-T2V-14B-Diffusers DN_BACKEND=cuda DN_SLICE_TIMEOUT=600 \
    DN_THREADS=8 POD_IP=10.1.2.3 LWS_LEADER_ADDRESS=denoised-worker-3.denoised-worker.denoised \
    LWS_GROUP_SIZE=2 "$@" sh "$root/deploy/k8s/overlays/gpu-multinode/launch-worker.sh" 2>&1
}
want_flags() {  # want_flags NAME WORKER_INDEX FIRST_RANK
  local out
  if ! out=$(launch LWS_WORKER_INDEX="$2"); then failed "launch-worker.sh ($1): exited non-zero: $out"; return; fi
  local want="worker --coordinator=denoised-coordinator:50052 --model=/models/Wan2.1-T2V-14B-Diffusers"
  want+=" --backend=cuda --group-size=16 --first-rank=$3 --local-ranks=8 --name=denoised-worker-3"
  want+=" --host=10.1.2.3 --slice-timeout=600 --metrics-listen=0.0.0.0:9400 --threads=8"
  if [[ $(tr '\n' ' ' <<<"$out" | sed 's/ $//') == "$want" ]]; then pass "launch-worker.sh $1: $want"
  else failed "launch-worker.sh $1: got '$(tr '\n' ' ' <<<"$out")', want '$want'"; fi
}
want_flags "leader (LWS_WORKER_INDEX=0)" 0 0
want_flags "worker (LWS_WORKER_INDEX=1)" 1 8
# Bad environments stop the pod with a message naming the variable.
want_refusal() {  # want_refusal WHAT PATTERN VAR=VALUE...
  local what=$1 pattern=$2 out rc=0
  shift 2
  out=$(launch "$@") || rc=$?
  if [[ $rc -ne 0 && $out == *"$pattern"* && $out != *--group-size* ]]; then pass "launch-worker.sh refuses $what ($out)"
  else failed "launch-worker.sh did not refuse $what (rc $rc): $out"; fi
}
want_refusal "no LWS_WORKER_INDEX" "LWS_WORKER_INDEX is not set"
want_refusal "an index past the group" "LWS_WORKER_INDEX=2 is not below LWS_GROUP_SIZE=2" LWS_WORKER_INDEX=2
want_refusal "a non-numeric size" "LWS_GROUP_SIZE='two'" LWS_WORKER_INDEX=0 LWS_GROUP_SIZE=two
want_refusal "a loopback host" "POD_IP=127.0.0.1 is a loopback address" LWS_WORKER_INDEX=0 POD_IP=127.0.0.1
want_refusal "no POD_IP" "POD_IP is not set" LWS_WORKER_INDEX=0 POD_IP=

# --- 4. Prometheus rules --------------------------------------------------
echo "== prometheus rules ($(promtool --version 2>&1 | head -1))"
mkdir -p "$work/prometheus"
v rules "$root/deploy/prometheus/rules.yaml" "$work/prometheus/rules.yaml"
cp "$root/deploy/prometheus/rules_test.yaml" "$work/prometheus/"
if promtool check rules "$work/prometheus/rules.yaml"; then pass "promtool check rules"
else failed "promtool check rules"; fi
if (cd "$work/prometheus" && promtool test rules rules_test.yaml); then pass "promtool test rules"
else failed "promtool test rules"; fi

# --- 5. Grafana dashboard -------------------------------------------------
echo "== grafana dashboard"
dash_ok=0
if v dashboard "$root/deploy/grafana/denoised-dashboard.json" gen/dashboard.ts \
   && tsc_file gen/dashboard.ts; then
  pass "dashboard: structure + tsc satisfies Dashboard (@grafana/schema)"
  dash_ok=1
else
  failed "dashboard"
fi

echo "== the checks reject broken dashboards"
if [[ $dash_ok -eq 1 ]]; then mutants dashboard "$root/deploy/grafana/denoised-dashboard.json"
else failed "skipping the dashboard mutations: the real dashboard failed"; fi

# --- 6. Dockerfile --------------------------------------------------------
echo "== Dockerfile"
lint=$(cd "$node_dir" && node_modules/.bin/dockerfile-utils lint "$root/Dockerfile" 2>&1) && [[ -z $lint ]] \
  && pass "dockerfile-utils lint" || { echo "$lint"; failed "dockerfile-utils lint"; }
if v dockerfile "$root/Dockerfile" "$root"; then pass "Dockerfile structure"
else failed "Dockerfile structure"; fi

echo
if [[ $fails -gt 0 ]]; then
  echo "deploy/validate.sh: $fails check(s) failed" >&2
  exit 1
fi
echo "deploy/validate.sh: all checks passed"
