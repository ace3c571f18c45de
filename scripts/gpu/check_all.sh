#!/usr/bin/env bash
# One device call: correctness checks and benchmarks of the CUDA build on the GPU machine.
# Prepare here:  scripts/build.sh build-cuda -DDENOISED_CUDA=ON
#                ../shared/gpu/bundle.sh .gpu build-cuda/bin/*
#                mkdir -p .anchor && cp ../shared/anchors/usp_anchor.py .anchor/
# Run there:     . .gpu/env.sh && scripts/gpu/check_all.sh STAGE...   (carry .gpu and .anchor)
# Stages: info ops nccl tiny sp graphs commbench commvariants perf sdpasweep fp8 step step4k stepauto graphstep service fault step14b
#         cfgpar models lora ti2v
# (sp needs tiny first: it compares against tiny's 1-rank runs.)
# Graphs are on by default everywhere (--no-graphs or DN_CUDA_GRAPHS=0 turns them off;
# DN_FUSED_QKV_PACK=0 turns the fused q/k norm+RoPE+pack kernel off).
# Logs go to $OUT/all.log; a summary table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NGPU=$(nvidia-smi -L | wc -l)
summary=()
W=/tmp/dn; mkdir -p $W
stage() {  # stage NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/all.log" > "$W/$name.log"
  local s=$SECONDS
  timeout --kill-after=10 "$t" "$@" >>"$W/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-28s rc=%-3d %4ds' "$name" "$rc" $((SECONDS - s)))")
  cat "$W/$name.log" >> "$OUT/all.log"; tail -n 25 "$W/$name.log"
  return $rc
}

for st in "$@"; do
  case $st in
    info) stage info 60 bash -c 'nvidia-smi; nvidia-smi topo -m; python3 -c "import torch;print(torch.__version__, torch.cuda.nccl.version())"' ;;
    ops) stage ops 300 backend_ops_test ;;
    perf) stage perf 300 backend_ops_test --perf ;;
    nccl)
      stage nccl2 120 nccl_comm_test --world 2
      [[ $NGPU -ge 4 ]] && stage nccl4 120 nccl_comm_test --world 4 ;;
    tiny)
      # (1) The forward alone: one Euler step from given noise with guidance 1,
      #     compared as sigma_0 * v = start - x1 (CUDA bf16 vs CPU fp32).
      # (2) Whole runs (6 UniPC steps, CFG 5) for information.
      python3 scripts/gpu/compare_latents.py --make-noise 16,3,8,12 --seed 1 --out $W/tiny_start.safetensors
      for b in cpu cuda; do
        stage tiny_fwd_$b 120 denoised run --preset tiny --ranks 1 --backend $b --frames 9 --height 64 --width 96 --steps 1 --scheduler euler --guidance 1 --seed 7 --text-len 64 --latents $W/tiny_start.safetensors --out $W/tiny_fwd_$b.safetensors
        stage tiny_$b 120 denoised run --preset tiny --ranks 1 --backend $b --frames 9 --height 64 --width 96 --steps 6 --guidance 5 --seed 7 --text-len 64 --out $W/tiny_$b.safetensors
      done
      stage tiny_fwd_cmp 60 python3 scripts/gpu/compare_latents.py $W/tiny_fwd_cpu.safetensors $W/tiny_fwd_cuda.safetensors --base $W/tiny_start.safetensors --label "tiny forward cuda vs cpu" --max-rel-l2 1e-2
      stage tiny_cmp 60 python3 scripts/gpu/compare_latents.py $W/tiny_cpu.safetensors $W/tiny_cuda.safetensors --label "tiny 6 UniPC steps CFG 5 cuda vs cpu (info)" --max-rel-l2 3e-2
      # A 1.3B-shaped checkpoint cut to 2 layers.
      stage mid_ckpt 300 denoised make-checkpoint --preset wan2.1-t2v-1.3b --layers 2 --seed 3 --out $W/mid
      python3 scripts/gpu/compare_latents.py --make-noise 16,1,32,32 --seed 2 --out $W/mid_start.safetensors
      for b in cpu cuda; do
        stage mid_fwd_$b 300 denoised run --model $W/mid --ranks 1 --backend $b --threads 16 --frames 1 --height 256 --width 256 --steps 1 --scheduler euler --guidance 1 --seed 3 --text-len 512 --latents $W/mid_start.safetensors --out $W/mid_fwd_$b.safetensors
        stage mid_$b 300 denoised run --model $W/mid --ranks 1 --backend $b --threads 16 --frames 1 --height 256 --width 256 --steps 2 --guidance 5 --seed 3 --text-len 512 --out $W/mid_$b.safetensors
      done
      stage mid_fwd_cmp 60 python3 scripts/gpu/compare_latents.py $W/mid_fwd_cpu.safetensors $W/mid_fwd_cuda.safetensors --base $W/mid_start.safetensors --label "1.3B-shape 2 layers forward cuda vs cpu" --max-rel-l2 1e-2
      stage mid_cmp 60 python3 scripts/gpu/compare_latents.py $W/mid_cpu.safetensors $W/mid_cuda.safetensors --label "1.3B-shape 2 steps CFG 5 cuda vs cpu (info)" --max-rel-l2 3e-2 ;;
    sp)
      for p in 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage sp${p}_cuda 180 denoised run --preset tiny --ranks $p --backend cuda --frames 9 --height 64 --width 96 --steps 6 --guidance 5 --seed 7 --text-len 64 --out $W/tiny_cuda_p$p.safetensors
        stage sp${p}_cmp 60 python3 scripts/gpu/compare_latents.py $W/tiny_cuda.safetensors $W/tiny_cuda_p$p.safetensors --label "tiny cuda P=$p vs P=1" --max-rel-l2 1e-2
        stage sp${p}_mid 300 denoised run --model $W/mid --ranks $p --backend cuda --frames 1 --height 256 --width 256 --steps 2 --guidance 5 --seed 3 --text-len 512 --out $W/mid_cuda_p$p.safetensors
        stage sp${p}_midcmp 60 python3 scripts/gpu/compare_latents.py $W/mid_cuda.safetensors $W/mid_cuda_p$p.safetensors --label "1.3B-shape cuda P=$p vs P=1" --max-rel-l2 1e-2
      done ;;
    graphs)
      # Graph replay vs eager on the same ranks: same kernels, same buffers, so the latents should be
      # bit-identical (bound 1e-6 relative L2 = "exact up to printing"); tiny, 8 steps (P>1: steps 0-1
      # eager, 2 captures, 3-7 replay), CFG 5. Also P=2/4 with the unfused q/k path (DN_FUSED_QKV_PACK=0)
      # against the fused one: same maths, bound 1e-6 too.
      for p in 1 2 4; do
        [[ $NGPU -ge $p ]] || continue
        targs="--preset tiny --ranks $p --backend cuda --frames 9 --height 64 --width 96 --steps 8 --guidance 5 --seed 7 --text-len 64"
        stage graphs_on_p$p 180 denoised run $targs --out $W/g_on_p$p.safetensors
        stage graphs_off_p$p 180 denoised run $targs --no-graphs --out $W/g_off_p$p.safetensors
        stage graphs_cmp_p$p 60 python3 scripts/gpu/compare_latents.py $W/g_off_p$p.safetensors $W/g_on_p$p.safetensors --label "tiny P=$p graphs on vs off" --max-rel-l2 1e-6
        if [[ $p -gt 1 ]]; then
          stage graphs_unfused_p$p 180 env DN_FUSED_QKV_PACK=0 denoised run $targs --out $W/g_unf_p$p.safetensors
          stage graphs_fusedcmp_p$p 60 python3 scripts/gpu/compare_latents.py $W/g_unf_p$p.safetensors $W/g_on_p$p.safetensors --label "tiny P=$p fused vs unfused q/k pack" --max-rel-l2 1e-6
          stage graphs_sp_p$p 60 python3 scripts/gpu/compare_latents.py $W/g_on_p1.safetensors $W/g_on_p$p.safetensors --label "tiny graphs on P=$p vs P=1" --max-rel-l2 1e-2
        fi
      done ;;
    graphstep)
      # 1.3B step time, graphs on vs off, 32760 and 4096 tokens, 1/2/4 GPUs (look for the "graphs:" and
      # RESULT lines). --warmup 3 keeps the eager and capturing steps out of the timing.
      for p in 1 2 4; do
        [[ $NGPU -ge $p ]] || continue
        for g in graphs no-graphs; do
          stage gstep32k_${g}_p$p 240 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks $p --backend cuda --cfg --warmup 3 --iters 2 --$g
          stage gstep4k_${g}_p$p 180 denoised bench step --preset wan2.1-t2v-1.3b --tokens 4096 --ranks $p --backend cuda --cfg --warmup 3 --iters 5 --$g
        done
      done ;;
    commbench)
      for p in 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage comm_ours_p$p 300 denoised bench comm --ranks $p --backend nccl --max-bytes 256M --json $OUT/comm_ours_p$p.json
        stage comm_torch_p$p 300 torchrun --nproc_per_node $p bench/anchors/torch_alltoall.py --json $OUT/comm_torch_p$p.json
      done ;;
    commvariants)
      # The NCCL process group's modes (blocking, the default, and DN_NCCL_BLOCKING=0) beside the torch anchor.
      p=$NGPU; [[ $p -gt 4 ]] && p=4
      stage comm_torch_v_p$p 300 torchrun --nproc_per_node $p bench/anchors/torch_alltoall.py --json $OUT/comm_torch_v_p$p.json
      for v in "" "DN_NCCL_BLOCKING=0"; do
        tag=$(echo "${v:-default}" | tr -c 'a-zA-Z0-9\n' '_')
        stage comm_${tag}_p$p 300 env $v denoised bench comm --ranks $p --backend nccl --max-bytes 256M
      done ;;
    step)
      for p in 1 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage step32k_ours_p$p 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks $p --backend cuda --cfg --iters 5
        stage step32k_anchor_p$p 300 torchrun --nproc_per_node $p .anchor/usp_anchor.py --backend cudnn --modes direct,packed --seq 32760
      done ;;
    step4k)
      for p in 1 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage step4k_ours_p$p 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens 4096 --ranks $p --backend cuda --cfg --iters 10
        stage step4k_anchor_p$p 300 torchrun --nproc_per_node $p .anchor/usp_anchor.py --backend cudnn --modes direct,packed --seq 4096 --iters 10
      done ;;
    models)
      # Issue 15's paths, CUDA against the CPU on tiny checkpoints (4 steps, CFG 5): two experts with a
      # LoRA (GeluTanh path), Wan2.1 I2V (image embedder, GeluErf, image K/V), Wan2.2 I2V two experts,
      # Wan2.2 TI2V (48 channels, VAE 4x16x16: latent [48, 3, 4, 6]) with a first-frame condition (per-token
      # timesteps: frame 0's tokens at t = 0) and without one (text-only).
      C=scripts/gpu/compare_latents.py; mkdir -p $W/lora
      python3 $C --make-noise 257,24 --seed 4 --out $W/ie.safetensors --name image_embeds
      python3 $C --make-noise 20,3,8,12 --seed 5 --out $W/cond.safetensors --name condition_latents
      python3 $C --make-noise 48,1,4,6 --seed 6 --out $W/ti2v_cond.safetensors --name condition_latents
      denoised make-checkpoint --preset tiny-t2v-a14b --lora-out $W/lora/a.safetensors --lora-rank 8 > /dev/null
      margs="--frames 9 --height 64 --width 96 --steps 4 --guidance 5 --seed 7 --text-len 64 --ranks 1"
      for m in "tiny-t2v-a14b|--lora-dir $W/lora --lora a:0.8" "tiny-i2v-14b|--image-embeds $W/ie.safetensors --condition $W/cond.safetensors" "tiny-i2v-a14b|--condition $W/cond.safetensors" "tiny-ti2v|--condition $W/ti2v_cond.safetensors" "tiny-ti2v|"; do
        preset=${m%%|*}; extra=${m#*|}
        name=$preset; [[ $preset == tiny-ti2v && -z $extra ]] && name=tiny-ti2v-text
        for b in cpu cuda; do
          stage m_${name}_$b 180 denoised run --preset $preset --backend $b $margs $extra --out $W/m_${name}_$b.safetensors
        done
        stage m_${name}_cmp 60 python3 $C $W/m_${name}_cpu.safetensors $W/m_${name}_cuda.safetensors --label "$name cuda vs cpu (4 UniPC steps, CFG 5)" --max-rel-l2 3e-2
      done ;;
    ti2v)
      # Issue 15: the Wan2.2-TI2V-5B step at its 720p token count (121 x 704 x 1280 -> latent 48 x 31 x 44 x 80
      # -> 27280 tokens), CFG, with a seeded first-frame condition (per-token timesteps), one GPU.
      stage ti2v5b_720p_p1 400 denoised bench step --preset wan2.2-ti2v-5b --frames 121 --height 704 --width 1280 --ranks 1 --backend cuda --cfg --warmup 1 --iters 3
      stage ti2v5b_720p_anchor_p1 300 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 27280 --dim 3072 --heads 24 --ffn 14336 --layers 30 --iters 3 ;;
    fp8)
      # The fast tier's fp8 attention (docs/CUDA.md, "fp8 attention"): CUDA AttentionFp8 vs the CPU
      # emulation (bound 5e-2) and vs exact attention (1e-1), the e4m3-output graph, bad shapes and a
      # capture/replay with new inputs; then bf16 vs fp8 (incl. quantization) at the 1.3B shapes,
      # B=2 (CFG) x 12 heads x 128, 32760 and 4096 tokens (issue 16 target: fp8 >= 1.5x bf16).
      stage fp8_ops 300 backend_ops_test --op=AttentionFp8
      stage fp8_bench 300 sdpa_sweep --fp8 --tokens 32760,4096 --heads 12 --batch 2 --iters 20
      echo "---- fp8 summary"; grep -h -E "AttentionFp8|passed,|^FP8" $W/fp8_ops.log $W/fp8_bench.log | grep -v "^===" ;;
    sdpasweep)
      # The cuDNN engine space of the attention shapes (both CFG branches in one call, as the model runs
      # them): 1.3B at 32760 and 4096 tokens, 14B (40 heads) at 32760. SUMMARY lines: default vs fastest.
      stage sdpasweep_13b 400 sdpa_sweep --tokens 32760,4096 --heads 12 --batch 2 --iters 10 --limit 48
      stage sdpasweep_14b 300 sdpa_sweep --tokens 32760 --heads 40 --batch 2 --iters 5 --limit 24 ;;
    stepauto)
      # The step with the SDPA config autotuned at first use (DN_CUDNN_SDPA_AUTOTUNE=1) beside the default.
      stage step32k_auto_p1 300 env DN_CUDNN_SDPA_AUTOTUNE=1 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 5
      stage step4k_auto_p1 300 env DN_CUDNN_SDPA_AUTOTUNE=1 denoised bench step --preset wan2.1-t2v-1.3b --tokens 4096 --ranks 1 --backend cuda --cfg --iters 10 ;;
    lora)
      # Issue 15: the step with a rank-64 LoRA on every block Linear (unmerged low-rank path) against
      # none, 1.3B at 32760 tokens, beside the anchor, one GPU.
      mkdir -p $W/lora64
      denoised make-checkpoint --preset wan2.1-t2v-1.3b --lora-rank 64 --lora-out $W/lora64/r64.safetensors > /dev/null
      stage lora_none_p1 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 5
      stage lora_r64_p1 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 5 --lora-dir $W/lora64 --lora r64
      stage lora_anchor_p1 300 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 32760 ;;
    service) stage service 300 scripts/gpu/service_check.sh $NGPU 6 ;;
    fault) stage fault 420 scripts/gpu/fault_check.sh $NGPU ;;
    step14b)
      # Wan2.1-14B shape (40 layers, dim 5120, 40 heads, FFN 13824) at 480p, then 720p on all GPUs.
      for p in 1 2 4; do
        [[ $NGPU -ge $p ]] || continue
        stage step14b_ours_p$p 240 denoised bench step --preset wan2.1-t2v-14b --tokens 32760 --ranks $p --backend cuda --cfg --warmup 1 --iters 3
        stage step14b_anchor_p$p 240 torchrun --nproc_per_node $p .anchor/usp_anchor.py --backend cudnn --modes direct --seq 32760 --dim 5120 --heads 40 --ffn 13824 --layers 40 --iters 3
      done
      stage step14b720_ours_p$NGPU 240 denoised bench step --preset wan2.1-t2v-14b --tokens 75600 --ranks $NGPU --backend cuda --cfg --warmup 1 --iters 2
      stage step14b720_anchor_p$NGPU 240 torchrun --nproc_per_node $NGPU .anchor/usp_anchor.py --backend cudnn --modes direct --seq 75600 --dim 5120 --heads 40 --ffn 13824 --layers 40 --iters 2 ;;
    cfgpar)
      # CFG-parallel (2 CFG halves x P/2 Ulysses ranks, docs/ENGINE.md) on P = 2, 4, 8 GPUs: tiny latents
      # against Ulysses over P/2 ... 1 (bound 1e-2 like sp: cuBLASLt may pick other kernels for other
      # shard sizes), then the 1.3B step with and without --cfg-parallel, same call (docs/PERFORMANCE.md,
      # "CFG-parallel: expected gain" has the figures to compare with). At P = 8 the Ulysses-only step is
      # refused (12 heads do not divide 8): only cfg 2 x ulysses 4 runs there.
      for p in 2 4 8; do
        [[ $NGPU -ge $p ]] || continue
        targs="--preset tiny --backend cuda --frames 9 --height 64 --width 96 --steps 6 --guidance 5 --seed 7 --text-len 64"
        stage cfgpar_tiny_p$p 180 denoised run $targs --ranks $p --cfg-parallel --out $W/cfgpar_p$p.safetensors
        stage cfgpar_tiny_ref_p$p 180 denoised run $targs --ranks $((p / 2)) --out $W/cfgpar_ref_p$p.safetensors
        stage cfgpar_cmp_p$p 60 python3 scripts/gpu/compare_latents.py $W/cfgpar_ref_p$p.safetensors $W/cfgpar_p$p.safetensors --label "tiny cuda cfg 2 x ulysses $((p / 2)) vs ulysses $((p / 2))" --max-rel-l2 1e-2
        for t in 32760 4096; do
          stage cfgpar_step${t}_ulysses_p$p 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens $t --ranks $p --backend cuda --cfg --warmup 3 --iters 5
          stage cfgpar_step${t}_cfgpar_p$p 300 denoised bench step --preset wan2.1-t2v-1.3b --tokens $t --ranks $p --backend cuda --cfg --cfg-parallel --warmup 3 --iters 5
        done
      done ;;
    *) echo "unknown stage $st" ;;
  esac
done
echo; echo "==== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $NGPU)"
printf '%s\n' "${summary[@]}"
