#!/usr/bin/env bash
# The whole service on the GPU machine: a coordinator and one CUDA worker group of N ranks
# (Wan2.1-1.3B-shaped random weights made on the GPUs), one request through gRPC at
# 480x832x81 (32760 tokens), then the per-step metrics scraped from the coordinator.
# Usage (after . .gpu/env.sh): scripts/gpu/service_check.sh [RANKS] [STEPS]
set -uo pipefail
N=${1:-4}; STEPS=${2:-6}
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 1; kill -9 $(jobs -p) 2>/dev/null' EXIT
denoised coordinator --listen 127.0.0.1:7100 --metrics-listen 127.0.0.1:7101 --worker-listen 127.0.0.1:7102 > $W/coord.log 2>&1 &
sleep 1
denoised worker --coordinator 127.0.0.1:7102 --preset wan2.1-t2v-1.3b --ranks $N --backend cuda --name gpu-group --metrics-listen 127.0.0.1:7110 > $W/worker.log 2>&1 &
for i in $(seq 1 120); do
  curl -s --noproxy '*' 127.0.0.1:7101/metrics | grep -q 'denoised_worker_groups{.*state="ready".*} 1' && break
  sleep 1
done
echo "== group ready after ${i}s"; grep -E "ready|warm" $W/worker.log | tail -3
denoised generate --target 127.0.0.1:7100 --model wan2.1-t2v-1.3b --frames 81 --height 480 --width 832 --steps $STEPS --guidance 5 --seed 1 --text-len 512 --out $W/out.safetensors --no-progress
rc=$?
echo "== generate rc=$rc"
echo "== coordinator /metrics (step, all-to-all, skew, requests)"
curl -s --noproxy '*' 127.0.0.1:7101/metrics | grep -E '^denoised_(step_duration_seconds_(sum|count)|alltoall_duration_seconds_(sum|count)|rank_skew_seconds_(sum|count)|steps_total|requests_total)'
echo "== rank 0 /metrics"
curl -s --noproxy '*' 127.0.0.1:7110/metrics | grep -E '^denoised_rank_(step_duration_seconds_(sum|count)|device_memory_peak_bytes|info)'
[[ $rc -eq 0 ]] || { tail -n 40 $W/coord.log $W/worker.log; }
exit $rc
