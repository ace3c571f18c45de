#!/usr/bin/env bash
# NCCL-side faults on the GPU machine (issue 7): a coordinator and one N-rank CUDA worker group
# (Wan2.1-1.3B-shaped random weights made on the GPUs, 480x832x81 = 32760 tokens). For each
# scenario, a long request is started, a rank is hit once it has run a few steps, and we measure
#   - how long until the client's request ends, and with which status (must be an error, never a hang),
#   - how long until the group is READY again (launcher restarts it with generation + 1),
#   - that a fresh request then succeeds.
# Scenarios: kill-last (SIGKILL rank N-1), kill-0 (SIGKILL rank 0), stop-1 (SIGSTOP rank 1: the process
# stays alive but silent, so its peers sit in an NCCL collective; the coordinator's heartbeat timeout,
# set to 5 s here, fails the group and the launcher SIGKILLs it).
# Usage (after . .gpu/env.sh): scripts/gpu/fault_check.sh [RANKS]
# A dry run of the same script on CPU ranks (tiny model, small latent):
#   PATH=build/bin:$PATH BACKEND=cpu PRESET=tiny SHAPE="--frames 9 --height 64 --width 64" scripts/gpu/fault_check.sh 2
set -uo pipefail
N=${1:-4}
BACKEND=${BACKEND:-cuda}; PRESET=${PRESET:-wan2.1-t2v-1.3b}
SHAPE=${SHAPE:---frames 81 --height 480 --width 832}
W=$(mktemp -d)
trap 'pkill -CONT -f "denoised worker-rank" 2>/dev/null; kill $(jobs -p) 2>/dev/null; sleep 1; kill -9 $(jobs -p) 2>/dev/null' EXIT
HB=5
denoised coordinator --listen 127.0.0.1:7200 --metrics-listen 127.0.0.1:7201 --worker-listen 127.0.0.1:7202 \
  --heartbeat-timeout $HB > $W/coord.log 2>&1 &
sleep 1
denoised worker --coordinator 127.0.0.1:7202 --preset $PRESET --ranks $N --backend $BACKEND --name gpu-group \
  --metrics-listen 127.0.0.1:7210 > $W/worker.log 2>&1 &

now() { date +%s.%N; }
metric() {  # metric REGEX -> sum of matching samples
  curl -s --noproxy '*' 127.0.0.1:7201/metrics | grep -E "$1" | awk '{s+=$NF} END {print s+0}'
}
wait_ready() {  # wait_ready GENERATION TIMEOUT_S -> 0 when a READY group of that generation exists
  local gen=$1 t=$2 i
  for i in $(seq 1 $((t * 5))); do
    grep -q "group gpu-group (generation $gen, .*) is READY" $W/coord.log && return 0
    sleep 0.2
  done
  return 1
}
gen_req() {  # gen_req STEPS OUTNAME -> runs generate, prints rc
  denoised generate --target 127.0.0.1:7200 --model $PRESET $SHAPE \
    --steps $1 --guidance 5 --seed 1 --text-len 64 --out $W/$2.safetensors --no-progress > $W/$2.log 2>&1
}

for i in $(seq 1 180); do
  curl -s --noproxy '*' 127.0.0.1:7201/metrics | grep -q 'denoised_worker_groups{.*state="ready".*} 1' && break
  sleep 1
done
echo "== group ready after ${i}s"
gen_req 3 warm; echo "== warm-up request rc=$?"

fail=0
gen=1
scens="kill-last kill-0 stop-1"
# SIGSTOP of rank 1 needs a second rank; with one rank kill-last and kill-0 are the same rank.
[[ $N -lt 2 ]] && { scens="kill-last kill-0"; echo "== stop-1: skipped (needs 2 ranks, have $N)"; }
for scen in $scens; do
  case $scen in
    kill-last) rank=$((N - 1)); sig=KILL ;;
    kill-0) rank=0; sig=KILL ;;
    stop-1) rank=1; sig=STOP ;;
  esac
  pid=$(pgrep -f -- "worker-rank .*--rank $rank --world-size $N --generation $gen( |$)" | head -1)
  if [[ -z "$pid" ]]; then echo "== $scen: no pid for rank $rank generation $gen"; ps aux | grep worker-rank; fail=1; break; fi
  before=$(metric '^denoised_steps_total')
  gen_req 40 $scen &
  gpid=$!
  for i in $(seq 1 300); do
    (( $(metric '^denoised_steps_total') >= before + 3 )) && break
    sleep 0.1
  done
  t0=$(now)
  kill -$sig $pid
  wait $gpid; rc=$?
  t1=$(now)
  wait_ready $((gen + 1)) 120; ready=$?
  t2=$(now)
  gen=$((gen + 1))
  printf "== %-9s rank %d SIG%s at step ~%d: request rc=%d after %.2f s: %s\n" $scen $rank $sig \
    $(( $(metric '^denoised_steps_total') - before )) $rc $(awk "BEGIN{print $t1 - $t0}") \
    "$(grep -iE 'error|unavailable|aborted|deadline|failed' $W/$scen.log | tail -1)"
  printf "== %-9s group READY again (generation %d): %s after %.2f s\n" $scen $gen \
    $([[ $ready -eq 0 ]] && echo yes || echo NO) $(awk "BEGIN{print $t2 - $t0}")
  gen_req 3 after-$scen; rc2=$?
  echo "== $scen: next request rc=$rc2"
  [[ $rc -ne 0 && $ready -eq 0 && $rc2 -eq 0 ]] || fail=1
done
echo "== coordinator requests_total and group restarts"
curl -s --noproxy '*' 127.0.0.1:7201/metrics | grep -E '^denoised_(requests_total|group_restarts_total|worker_groups)'
echo "== rank-side NCCL errors (first lines)"
grep -iE "nccl|abort|watchdog" $W/worker.log | head -12
[[ $fail -eq 0 ]] || { echo "== FAILED"; tail -n 40 $W/coord.log $W/worker.log; }
exit $fail
