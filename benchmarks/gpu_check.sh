#!/usr/bin/env bash
# The GPU check of issue 13, in one call on a machine with CUDA (run from the repository root):
#
#     bash benchmarks/gpu_check.sh          # versions + GPU, the whole suite, then the demo in float32 and in bf16
#     bash benchmarks/gpu_check.sh suite    # versions + GPU and the suite only
#     bash benchmarks/gpu_check.sh demo     # versions + GPU and the two demos only
#     bash benchmarks/gpu_check.sh bench    # versions + GPU and the side-by-side with TRL (issue 14)
#
# bench needs TRL and datasets, which the accelerator machine lacks: run `bash benchmarks/gpu_wheels.sh` here first
# and name .whl in the device call's carry; the results go to $OUT/gpu.json (or /tmp/tether-gpu-check/gpu.json).
#
# It prints what BENCHMARKS.md needs: torch / transformers versions, the GPU, the suite's result, and for each demo
# its wall time and the held-out gold score of SFT and PPO (summary.json's sft.gold / ppo.gold). Demo runs go to
# /tmp/tether-gpu-check/. It exits non-zero if the suite or a demo failed (after running everything asked for).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
what="${1:-all}"
out=/tmp/tether-gpu-check
status=0

python - <<'EOF'
import torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print("GPU: none (torch.cuda.is_available() is False): the cuda cases will skip and the demos fail")
EOF

if [ "$what" = all ] || [ "$what" = suite ]; then
    echo "== the whole suite: python -m pytest -q"
    start=$(date +%s)
    python -m pytest -q -rs --durations=5 || status=1
    echo "suite wall time: $(( $(date +%s) - start )) s"
fi

if [ "$what" = all ] || [ "$what" = demo ]; then
    for dtype in float32 bfloat16; do
        run="$out/demo-$dtype"
        rm -rf "$run"
        echo "== tether demo model.device=cuda model.dtype=$dtype (output_dir=$run)"
        start=$(date +%s.%N)
        if python -m tether.cli demo model.device=cuda "model.dtype=$dtype" "output_dir=$run" > "$out-$dtype.log" 2>&1;
        then
            wall=$(python -c "print(f'{$(date +%s.%N) - $start:.0f}')")
            tail -n 11 "$out-$dtype.log"
            python - "$run/summary.json" "$dtype" "$wall" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"demo {sys.argv[2]}: wall {sys.argv[3]} s (summary: {s['wall_seconds']:.0f} s); "
      f"gold SFT {s['sft.gold']:+.3f} -> PPO {s['ppo.gold']:+.3f}; correct {s['sft.correct']:.1%} -> "
      f"{s['ppo.correct']:.1%}; KL {s['ppo.kl']:.2f} nats; RM vs gold {s['rm.accuracy']:.1%}")
EOF
        else
            status=1
            echo "demo $dtype FAILED; the end of $out-$dtype.log:"
            tail -n 30 "$out-$dtype.log"
        fi
    done
fi
if [ "$what" = bench ]; then
    echo "== side by side with TRL 1.12: python benchmarks/vs_trl_gpu.py"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || status=1
    mkdir -p "${OUT:-$out}"
    python3 benchmarks/vs_trl_gpu.py --out "${OUT:-$out}/gpu.json" || status=1
fi
exit $status
