#!/usr/bin/env bash
# The first run on a GPU machine, in one go, each part under its own time limit (docs/gpu.md: what each must show).
#
#   ./gpu_check.sh --wheelhouse DIR [--python X.Y]   where PyPI is reachable: the wheels of every runtime dependency the
#                                                    GPU run needs and a node lacks, for its Python (default 3.12)
#   ./gpu_check.sh [--offline DIR] [--logs DIR]      on the GPU node: install DIR's wheels on top of its own torch (no
#                                                    index needed), then the parts; logs and summary.md in DIR of --logs
#
# Exit status: 0 every part passed, 1 a part failed (summary.md says which), 2 bad arguments, 3 no CUDA GPU (one line,
# nothing run). Runs from any directory (it cd's to its own folder) and reruns into the same --logs folder.
set -uo pipefail
die() { echo "error: $*" >&2; exit 2; }
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # folders named from where it was called

# What the wheelhouse holds: what train.py, eval.py, bench.py and the GPU tests import and a node lacks (docs/gpu.md
# lists what a node has). Left out: torch (the node's CUDA build), transformers (the node's 5.17 is supported:
# docs/gpu.md), flash-attn (sdpa is used), rouge-score and nltk (only --rewards video_r1_accuracy's free-form answers;
# rouge-score has no wheel), jiwer (a CPU test's cross-check).
WHEELS=(
    decord==0.6.0 av==18.1.0                                          # data.py: read the videos, write the tiny ones
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2   # rewards.video_r1_first_accuracy
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5  # deepspeed's
)
DEEPSPEED=deepspeed==0.19.8  # no wheel on PyPI: built here as pure Python, its C++/CUDA ops compiled when first used
WHEELHOUSE_MAX=$((64 * 1024 * 1024))

wheelhouse= python_version=3.12 offline= logs=$(cd "$(dirname "$0")" && pwd)/gpu_check_logs
while [ $# -gt 0 ]; do
    case $1 in
        --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse needs a folder"; wheelhouse=$(absolute "$2"); shift 2 ;;
        --python) [ $# -ge 2 ] && [[ $2 =~ ^3\.[0-9]+$ ]] || die "--python needs a version X.Y, e.g. 3.12"; python_version=$2; shift 2 ;;
        --offline) [ $# -ge 2 ] || die "--offline needs the wheelhouse folder"; offline=$(absolute "$2"); shift 2 ;;
        --logs) [ $# -ge 2 ] || die "--logs needs a folder"; logs=$(absolute "$2"); shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see ./gpu_check.sh --help)" ;;
    esac
done

cd "$(dirname "$0")" || exit 2  # the code's folder: test files, train.py and bench.py are named from here

# ---- the wheelhouse, built where the index is reachable -------------------------------------------------------------
if [ -n "$wheelhouse" ]; then
    [ -z "$offline" ] || die "--wheelhouse builds, --offline installs: one at a time"
    [ ! -e "$wheelhouse" ] || [ -z "$(ls -A "$wheelhouse")" ] || die "--wheelhouse $wheelhouse is not empty: name a new folder"
    mkdir -p "$wheelhouse" || die "--wheelhouse $wheelhouse cannot be created"
    py=${PYTHON:-python3}
    platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
        platforms+=(--platform "${p}_x86_64")
    done
    set -e
    "$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$python_version" \
        "${platforms[@]}" -d "$wheelhouse" "${WHEELS[@]}"
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-binary deepspeed -w "$wheelhouse" "$DEEPSPEED"
    set +e
    bytes=$(cat "$wheelhouse"/*.whl | wc -c)
    echo "wheelhouse $wheelhouse: $(ls "$wheelhouse" | wc -l) wheels for Python $python_version, $((bytes / 1024 / 1024)) MiB"
    [ "$bytes" -le "$WHEELHOUSE_MAX" ] || { echo "wheelhouse: over 64 MiB, more than travels to a node" >&2; exit 1; }
    exit 0
fi

# ---- the check, on the GPU node ---------------------------------------------------------------------------------------
[ -z "$offline" ] || ls "$offline"/*.whl > /dev/null 2>&1 || die "--offline $offline holds no wheels"
if [ -e "$logs" ] && [ -n "$(ls -A "$logs")" ] && [ ! -f "$logs/summary.md" ]; then
    die "--logs $logs holds files of something else: name a new folder"
fi
rm -rf "$logs" && mkdir -p "$logs" && echo "# gpu_check: did not finish" > "$logs/summary.md" || die "--logs $logs cannot be created"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
summary=() failed=0 start=$SECONDS
part() {  # part NAME SECONDS COMMAND...: run it under a time limit, keep its log, add a summary row
    local name=$1 limit=$2 t0=$SECONDS; shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$logs/$name.log"
    local verdict=passed
    [ "$rc" = 0 ] || { failed=1; verdict="FAILED (exit $rc$([ "$rc" = 124 ] && echo ", over its ${limit}s"))"; }
    summary+=("| $name | $verdict | $((SECONDS - t0)) s | ${note:-} |")
    note=
    echo "== $name: $verdict"
}
if [ -n "$offline" ]; then  # the wheels on top of the node's torch, numpy, transformers: no index, no dependency solving
    site=${TMPDIR:-/tmp}/gpu_check_site
    rm -rf "$site"
    note="$(ls "$offline"/*.whl | wc -l) wheels into $site" part install 30 \
        python -m pip install -q --no-index --no-deps --no-compile --target "$site" "$offline"/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False or torch is missing): nothing run, exit 3" |
        tee "$logs/summary.md"
    exit 3
fi
python - << 'EOF' | tee "$logs/versions.log"
import importlib.util, torch, transformers, deepspeed
print("GPUs:", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__,
      "| deepspeed", deepspeed.__version__, "| attention:",
      "flash-attn installed" if importlib.util.find_spec("flash_attn") else "flash-attn not installed: sdpa")
EOF
gpus=$(python -c "import torch; print(torch.cuda.device_count())")

# limits: 30 + 180 + 150 + 110 s = 7.8 minutes at most (docs/gpu.md: the estimate per part)
part tests 180 python -m pytest -m "gpu or torch_api" -q -rs -s test_gpu.py test_decode_shapes.py \
    --deselect test_gpu.py::test_one_step_2b_shaped  # the bench part runs it at full 2B, checked below
part bench 150 python bench.py --shape 2b --device cuda --repeats 1
grep -E "compiled decode|kept:|peak" "$logs/bench.log" | head -n 6 > "$logs/bench_summary.log"
python - "$logs/bench.log" << 'EOF' >> "$logs/bench_summary.log" || { failed=1; summary+=("| bench: CUDA graphs replay, no skip | FAILED | | |"); }
import json, sys  # test_one_step_2b_shaped's checks on the full-2B run
lines = [l for l in open(sys.argv[1]) if l.startswith("BENCH_JSON ")]
r = json.loads(lines[-1][len("BENCH_JSON "):]) if lines else {}
ok = r.get("graph_replays_per_token_compiled", 0) >= 1 and r.get("cudagraph_skips") == 0 and r.get("cuda_graphs", 0) >= 1
print("bench:", {k: r.get(k) for k in ("graph_replays_per_token_compiled", "cudagraph_skips", "cuda_graphs", "decode_shapes")})
sys.exit(0 if ok else 1)
EOF
# 12 steps of the tiny run with the compiled rollout; on 2+ GPUs on 2 ranks (the only 2-rank run: pytest has none)
run=(train.py --tiny --compile_rollout on --max_steps 12 --output_dir "$logs/tiny_run")
launch=(python)
[ "$gpus" -ge 2 ] && launch=(deepspeed --num_gpus 2)
TORCH_LOGS=recompiles part tiny_run 110 "${launch[@]}" "${run[@]}"
# each rank compiles each decode shape once (the first is no recompile): more is a guard failing on something else;
# a release (CUDA_GRAPHS_MAX passed) or an eager fallback is the storm test_decode_shapes guards against on CPU
recompiles=$(grep -c "Recompiling function decode_step" "$logs/tiny_run.log")
state=$(sed -n "s/^compiled rollout: //p" "$logs/tiny_run.log")
shapes=$(python -c "import ast, sys; print(len(ast.literal_eval(sys.argv[1] or '{}').get('decode_shapes', {})))" "$state")
graphs=$(python -c "import ast, sys; print(ast.literal_eval(sys.argv[1] or '{}').get('cuda_graphs'))" "$state")
ranks=$([ "$gpus" -ge 2 ] && echo 2 || echo 1)
check() {  # check DESCRIPTION STATUS NOTE: a summary row; a failure when STATUS is not 0
    summary+=("| tiny_run: $1 | $([ "$2" = 0 ] && echo passed || echo FAILED) | | $3 |")
    [ "$2" = 0 ] || failed=1
}
grep -q "step 12/12" "$logs/tiny_run.log"; check "step 12/12" $? ""
[ "$shapes" -ge 1 ] && [ "$recompiles" -le $((ranks * (shapes - 1))) ]
check "decode_step recompiles <= ranks x (shapes - 1)" $? \
    "$recompiles recompiles, $shapes shapes on rank 0, $ranks rank(s), $graphs CUDA graphs on rank 0"
! grep -qE "runs eagerly|CUDA graphs recorded for the decode step" "$logs/tiny_run.log"
check "no eager fallback, no release" $? ""

{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - start)) s"
    echo
    sed 's/^/    /' "$logs/versions.log"
    echo
    echo "| part | result | time | note |"
    echo "|---|---|---|---|"
    printf '%s\n' "${summary[@]}"
    echo
    sed 's/^/    /' "$logs/bench_summary.log"
} > "$logs/summary.md"
cat "$logs/summary.md"
echo "gpu_check: $([ $failed = 0 ] && echo "all parts passed" || echo "FAILED, see $logs/")"
exit $failed
