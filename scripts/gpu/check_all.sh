#!/usr/bin/env bash
# One device call: correctness checks and benchmarks of the CUDA build on the GPU machine.
# Prepare here:  scripts/build.sh build-cuda -DDENOISED_CUDA=ON
#                ../shared/gpu/bundle.sh .gpu build-cuda/bin/*
#                mkdir -p .anchor && cp ../shared/anchors/usp_anchor.py .anchor/
# Run there:     . .gpu/env.sh && scripts/gpu/check_all.sh STAGE...   (carry .gpu and .anchor)
# Stages: info ops nccl tiny sp commbench perf step step4k
# Logs go to $OUT/<stage>.log; a summary table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NGPU=$(nvidia-smi -L | wc -l)
summary=()
stage() {  # stage NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/$name.log"
  local s=$SECONDS
  timeout --kill-after=10 "$t" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-28s rc=%-3d %4ds' "$name" "$rc" $((SECONDS - s)))")
  tail -n 25 "$OUT/$name.log"
  return $rc
}
W=/tmp/dn; mkdir -p $W
for st in "$@"; do
  case $st in
    info) stage info 60 bash -c 'nvidia-smi; nvidia-smi topo -m; python3 -c "import torch;print(torch.__version__, torch.cuda.nccl.version())"' ;;
    ops) stage ops 300 backend_ops_test ;;
    perf) stage perf 300 backend_ops_test --perf ;;
    nccl)
      stage nccl2 120 nccl_comm_test --world 2
      [[ $NGPU -ge 4 ]] && stage nccl4 120 nccl_comm_test --world 4 ;;
    tiny)
      stage tiny_cpu 120 denoised run --preset tiny --ranks 1 --backend cpu --frames 9 --height 64 --width 96 --steps 6 --guidance 5 --seed 7 --text-len 64 --out $W/tiny_cpu.safetensors
      stage tiny_cuda 120 denoised run --preset tiny --ranks 1 --backend cuda --frames 9 --height 64 --width 96 --steps 6 --guidance 5 --seed 7 --text-len 64 --out $W/tiny_cuda.safetensors
      stage tiny_cmp 60 python3 scripts/gpu/compare_latents.py $W/tiny_cpu.safetensors $W/tiny_cuda.safetensors --label "tiny cuda vs cpu" --max-rel-l2 1e-2
      # A 1.3B-shaped checkpoint cut to 2 layers, one step of the forward.
      stage mid_ckpt 300 denoised make-checkpoint --preset wan2.1-t2v-1.3b --layers 2 --seed 3 --out $W/mid
      stage mid_cpu 300 denoised run --model $W/mid --ranks 1 --backend cpu --threads 16 --frames 1 --height 256 --width 256 --steps 2 --guidance 5 --seed 3 --text-len 512 --out $W/mid_cpu.safetensors
      stage mid_cuda 300 denoised run --model $W/mid --ranks 1 --backend cuda --frames 1 --height 256 --width 256 --steps 2 --guidance 5 --seed 3 --text-len 512 --out $W/mid_cuda.safetensors
      stage mid_cmp 60 python3 scripts/gpu/compare_latents.py $W/mid_cpu.safetensors $W/mid_cuda.safetensors --label "1.3B-shape 2 layers cuda vs cpu" --max-rel-l2 1e-2 ;;
    sp)
      for p in 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage sp${p}_cuda 180 denoised run --preset tiny --ranks $p --backend cuda --frames 9 --height 64 --width 96 --steps 6 --guidance 5 --seed 7 --text-len 64 --out $W/tiny_cuda_p$p.safetensors
        stage sp${p}_cmp 60 python3 scripts/gpu/compare_latents.py $W/tiny_cuda.safetensors $W/tiny_cuda_p$p.safetensors --label "tiny cuda P=$p vs P=1" --max-rel-l2 1e-2
        stage sp${p}_mid 300 denoised run --model $W/mid --ranks $p --backend cuda --frames 1 --height 256 --width 256 --steps 2 --guidance 5 --seed 3 --text-len 512 --out $W/mid_cuda_p$p.safetensors
        stage sp${p}_midcmp 60 python3 scripts/gpu/compare_latents.py $W/mid_cuda.safetensors $W/mid_cuda_p$p.safetensors --label "1.3B-shape cuda P=$p vs P=1" --max-rel-l2 1e-2
      done ;;
    commbench)
      for p in 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage comm_ours_p$p 300 denoised bench comm --ranks $p --backend nccl --max-bytes 256M --json $OUT/comm_ours_p$p.json
        stage comm_torch_p$p 300 torchrun --nproc_per_node $p bench/anchors/torch_alltoall.py --json $OUT/comm_torch_p$p.json
      done ;;
    step)
      for p in 1 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage step32k_ours_p$p 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks $p --backend cuda --cfg --iters 5
        stage step32k_anchor_p$p 300 torchrun --nproc_per_node $p .anchor/usp_anchor.py --backend cudnn --modes direct,packed --seq 32760
      done ;;
    step4k)
      for p in 1 4; do
        [[ $NGPU -ge $p ]] || continue
        stage step4k_ours_p$p 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens 4096 --ranks $p --backend cuda --cfg --iters 10
        stage step4k_anchor_p$p 300 torchrun --nproc_per_node $p .anchor/usp_anchor.py --backend cudnn --modes direct,packed --seq 4096 --iters 10
      done ;;
    *) echo "unknown stage $st" ;;
  esac
done
echo; echo "==== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $NGPU)"
printf '%s\n' "${summary[@]}"
