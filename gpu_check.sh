#!/usr/bin/env bash
# The first run on a GPU machine, in one go: the GPU tests, the 2B-shaped benchmark, the 2-rank compiled run.
# docs/gpu.md says what each part must show. Usage: ./gpu_check.sh [LOG_DIR]   (about 10 minutes on one H100)
set -uo pipefail
logs=${1:-gpu_check}
mkdir -p "$logs"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
failed=0
part() {  # part NAME COMMAND...: run it, keep its log, report its exit status on one line
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" = 0 ] || failed=1
}
nvidia-smi -L
python -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
part tests python -m pytest -m gpu -q -rs -s test_gpu.py
part bench python bench.py --shape 2b --device cuda --repeats 1
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    TORCH_LOGS=recompiles part two_ranks deepspeed --num_gpus 2 train.py --tiny --compile_rollout on --max_steps 12 \
        --output_dir "$logs/two_ranks_run"
    echo "decode_step recompiles, both ranks: $(grep -c 'Recompiling function decode_step' "$logs/two_ranks.log")"
fi
echo "gpu_check: $([ $failed = 0 ] && echo all parts passed || echo FAILED, see $logs/)"
exit $failed
