#!/usr/bin/env bash
# Issue 16 part 3 on one GPU: the fast tier's step times beside the exact path and the anchor, and its
# quality on the 1.3B shape (random weights) and on the trained demo model. Run on the device machine
# after `. .gpu/env.sh`; logs go to $OUT (or ./fast-tier-out).
set -uo pipefail
O=${OUT:-fast-tier-out}; mkdir -p $O
# ALL_LOG=FILE: every run's whole log is appended there as soon as it ends (a call cut off at its limit
# still brings back what ran).
run() { local name=$1 t=$2 s=$SECONDS; shift 2; echo "==== $name: $*"; timeout $t "$@" > $O/$name.log 2>&1; echo "rc=$? ($name, $((SECONDS - s)) s)"; { echo "######## $name: $*"; cat $O/$name.log; } >> ${ALL_LOG:-/dev/null}; grep -E "^RESULT|fast tier|ms/step|median|TARGET|^\||^FP8 (SWEEP|B=)|passed|step_ms|Traceback|Error" $O/$name.log | head -40; }
case ${1:-step} in
  step)
    for tok in 32760 4096; do
      it=5; [[ $tok == 4096 ]] && it=20
      run step${tok}_exact 200 denoised bench step --preset wan2.1-t2v-1.3b --tokens $tok --ranks 1 --backend cuda --cfg --iters $it
      run step${tok}_fp8 200 denoised bench step --preset wan2.1-t2v-1.3b --tokens $tok --ranks 1 --backend cuda --cfg --iters $it --attention-fp8
      run step${tok}_cache1 200 denoised bench step --preset wan2.1-t2v-1.3b --tokens $tok --ranks 1 --backend cuda --cfg --iters $it --cache-threshold 1
      run step${tok}_fp8_cache1 200 denoised bench step --preset wan2.1-t2v-1.3b --tokens $tok --ranks 1 --backend cuda --cfg --iters $it --attention-fp8 --cache-threshold 1
    done
    run anchor32760 200 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 32760
    run anchor4096 200 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 4096 --iters 10 ;;
  fp8step)
    # The fp8 rows with the exact baseline and the anchor again (same card, same call).
    for tok in 32760 4096; do
      it=5; [[ $tok == 4096 ]] && it=20
      run step${tok}_exact 200 denoised bench step --preset wan2.1-t2v-1.3b --tokens $tok --ranks 1 --backend cuda --cfg --iters $it
      run step${tok}_fp8 200 denoised bench step --preset wan2.1-t2v-1.3b --tokens $tok --ranks 1 --backend cuda --cfg --iters $it --attention-fp8
    done
    run step32760_fp8_cache1 200 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 5 --attention-fp8 --cache-threshold 1
    run anchor32760 200 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 32760
    run anchor4096 200 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 4096 --iters 10 ;;
  quality13b)
    run quality_13b 300 denoised bench quality --backend cuda --preset wan2.1-t2v-1.3b --tokens 32760 --steps 10 --prompts 1 --seeds 1 --thresholds 0.05,0.1,0.2 ;;
  qualitydemo)
    run quality_demo 300 denoised bench quality --backend cuda --model tools/demo_model ;;
  step14b)
    run step14b_exact 200 denoised bench step --preset wan2.1-t2v-14b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 3
    run step14b_fp8 200 denoised bench step --preset wan2.1-t2v-14b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 3 --attention-fp8 ;;
  all)
    # Every tier at both shapes in one call (the machine stays warm only 30 s between calls):
    # the op check of the device-side cache signal first, then 1.3B 32760, 1.3B 4096 and 14B 32760,
    # each with its exact baseline and anchor, and the cache's decisions on the trained demo model.
    run ops_tile 120 backend_ops_test --op=TileAbsDiffSums
    for tier in exact fp8 cache1 fp8_cache1; do
      f=(); [[ $tier == *fp8* ]] && f+=(--attention-fp8); [[ $tier == *cache1 ]] && f+=(--cache-threshold 1)
      run step32760_$tier 120 denoised bench step --preset wan2.1-t2v-1.3b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 5 "${f[@]}"
    done
    run anchor32760 150 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 32760
    for tier in exact fp8 cache1 fp8_cache1; do
      f=(); [[ $tier == *fp8* ]] && f+=(--attention-fp8); [[ $tier == *cache1 ]] && f+=(--cache-threshold 1)
      run step4096_$tier 60 denoised bench step --preset wan2.1-t2v-1.3b --tokens 4096 --ranks 1 --backend cuda --cfg --iters 20 "${f[@]}"
    done
    run anchor4096 100 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 4096 --iters 10
    for tier in exact cache1 fp8_cache1; do
      f=(); [[ $tier == *fp8* ]] && f+=(--attention-fp8); [[ $tier == *cache1 ]] && f+=(--cache-threshold 1)
      run step14b_$tier 120 denoised bench step --preset wan2.1-t2v-14b --tokens 32760 --ranks 1 --backend cuda --cfg --iters 3 "${f[@]}"
    done
    run anchor14b 200 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 32760 --dim 5120 --heads 40 --ffn 13824 --layers 40 --iters 2
    run quality_demo_cache 120 denoised bench quality --backend cuda --model tools/demo_model --prompts 6 --seeds 1 --thresholds 0.1,0.2 --fp8 off
    run fp8sweep 150 sdpa_sweep --fp8 --fp8-sweep --tokens 32760 --iters 5 --limit 16 ;;
  14b4096)
    # The 14B shape at 4096 tokens, every tier, beside its anchor; then the fp8 engine sweep at 4096.
    for tier in exact fp8 cache1 fp8_cache1; do
      f=(); [[ $tier == *fp8* ]] && f+=(--attention-fp8); [[ $tier == *cache1 ]] && f+=(--cache-threshold 1)
      run step14b4096_$tier 60 denoised bench step --preset wan2.1-t2v-14b --tokens 4096 --ranks 1 --backend cuda --cfg --iters 10 "${f[@]}"
    done
    run anchor14b4096 120 torchrun --nproc_per_node 1 .anchor/usp_anchor.py --backend cudnn --modes direct --seq 4096 --dim 5120 --heads 40 --ffn 13824 --layers 40 --iters 5
    run fp8sweep4096 60 sdpa_sweep --fp8 --fp8-sweep --tokens 4096 --iters 20 --limit 16 ;;
esac
