#!/usr/bin/env bash
# The GPU checks of issues 13 and 14 on a machine with CUDA (run from the repository root):
#
#     bash benchmarks/gpu_check.sh budget   # all of it in one device call of under 10 minutes (below)
#     bash benchmarks/gpu_check.sh          # versions + GPU, the whole suite, then the demo in float32 and in bf16
#     bash benchmarks/gpu_check.sh suite    # versions + GPU and the suite only
#     bash benchmarks/gpu_check.sh demo     # versions + GPU and the two demos only
#     bash benchmarks/gpu_check.sh bench    # versions + GPU and the side-by-side with TRL (issue 14)
#
# The accelerator machine lacks TRL, datasets and gguf: run `bash benchmarks/gpu_wheels.sh` here first and name
# .whl in the device call's carry; every mode installs them into /tmp/site when .whl is there.
#
# budget: the suite starts in the background (its CUDA cases are light on the card; their files first) while the two
# demos run; the suite gets until minute 5.5, then the side-by-side runs alone on the card (both shapes, 2 timed
# iterations each side) until minute 9.5. Each part has its own time limit, so a slow one cannot eat the others' time; what finished
# is kept. Logs and JSON go to $OUT (or /tmp/tether-gpu-check).
#
# It prints what BENCHMARKS.md needs: torch / transformers versions, the GPU, the suite's result, for each demo its
# wall time and the held-out gold score of SFT and PPO (summary.json), and the side-by-side's ratios. It exits
# non-zero if anything failed or ran out of time (after running everything asked for).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
what="${1:-all}"
out="${OUT:-/tmp/tether-gpu-check}"
mkdir -p "$out"
status=0
begin=$(date +%s)
left() {  # seconds (at least 1) until second $1 of this script
    local n=$(( $1 - ($(date +%s) - begin) ))
    echo $(( n > 0 ? n : 1 ))
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site" || status=1
fi

python - <<'EOF'
import torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print("GPU: none (torch.cuda.is_available() is False): the cuda cases will skip and the demos fail")
EOF

demo() {  # demo DTYPE [SECONDS]: one `tether demo` on the GPU and its summary line
    local dtype=$1 run="$out/demo-$1" start
    rm -rf "$run"
    echo "== tether demo model.device=cuda model.dtype=$dtype (output_dir=$run)"
    start=$(date +%s.%N)
    if timeout "${2:-3000}" python -m tether.cli demo model.device=cuda "model.dtype=$dtype" "output_dir=$run" \
        > "$out/demo-$dtype.log" 2>&1; then
        wall=$(python -c "print(f'{$(date +%s.%N) - $start:.0f}')")
        tail -n 11 "$out/demo-$dtype.log"
        python - "$run/summary.json" "$dtype" "$wall" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"demo {sys.argv[2]}: wall {sys.argv[3]} s (summary: {s['wall_seconds']:.0f} s); "
      f"gold SFT {s['sft.gold']:+.3f} -> PPO {s['ppo.gold']:+.3f}; correct {s['sft.correct']:.1%} -> "
      f"{s['ppo.correct']:.1%}; KL {s['ppo.kl']:.2f} nats; RM vs gold {s['rm.accuracy']:.1%}")
EOF
    else
        status=1
        echo "demo $dtype FAILED or ran out of time; the end of $out/demo-$dtype.log:"
        tail -n 30 "$out/demo-$dtype.log"
    fi
}

bench() {  # bench [SECONDS] [ARGS...]: the side-by-side with TRL, alone on the card
    local limit=${1:-3000}
    shift
    echo "== side by side with TRL 1.12: python benchmarks/vs_trl_gpu.py $* (limit ${limit} s)"
    timeout "$limit" python3 benchmarks/vs_trl_gpu.py --out "$out/gpu.json" "$@" > "$out/bench.log" 2>&1 || status=1
    tail -n 40 "$out/bench.log"
}

# the test files with CUDA cases (the device fixture or a CUDA-only test): run first, so that a suite stopped at its
# time limit has run them, then the rest
cuda_first="tests/test_decoding.py tests/test_precision.py tests/test_trainers.py tests/test_legacy.py
    tests/test_sampling.py tests/test_rollout.py tests/test_offload.py tests/test_dpo.py tests/test_cli_errors.py
    tests/algo/test_logprobs.py tests/test_trl011_ppo_script.py"

case "$what" in
budget)
    echo "== the whole suite in the background, the files with CUDA cases first (log: $out/suite.log)"
    ignored=$(printf -- "--ignore=%s " $cuda_first)
    (  # each pytest in the background of this subshell, its pid in a file, so that a stop reaches it
        python -m pytest -q -rs $cuda_first & echo $! > "$out/pytest.pid"; wait $!; first=$?
        python -m pytest -q -rs --durations=5 $ignored tests & echo $! > "$out/pytest.pid"; wait $!
        exit $(( first || $? ))
    ) > "$out/suite.log" 2>&1 &
    suite=$!
    demo float32 150
    demo bfloat16 150
    if ! timeout "$(left 330)" tail --pid=$suite -f /dev/null; then
        echo "suite: out of time at minute 5.5, stopped; what it printed:"
        kill $suite 2>/dev/null  # the subshell first, so no later pytest starts
        kill -INT "$(cat "$out/pytest.pid")" 2>/dev/null; sleep 5; kill "$(cat "$out/pytest.pid")" 2>/dev/null
        status=1
    fi
    wait $suite || status=1
    tail -n 15 "$out/suite.log"
    echo "suite + demos: $(( $(date +%s) - begin )) s"
    bench "$(left 570)" --iterations 2 --warmup 1
    ;;
all | suite | demo)
    if [ "$what" != demo ]; then
        echo "== the whole suite: python -m pytest -q"
        start=$(date +%s)
        python -m pytest -q -rs --durations=5 || status=1
        echo "suite wall time: $(( $(date +%s) - start )) s"
    fi
    if [ "$what" != suite ]; then
        demo float32
        demo bfloat16
    fi
    ;;
bench) bench ;;
*) echo "gpu_check.sh: unknown mode '$what' (budget, all, suite, demo or bench)"; exit 2 ;;
esac
echo "total: $(( $(date +%s) - begin )) s"
exit $status
