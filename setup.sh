#!/usr/bin/env bash
# From a fresh clone to the demo in one command (the README's quick start); rerunnable:
#   ./setup.sh            .venv (reused when there), PyTorch's CPU build where there is no GPU, requirements.txt,
#                         then the demo, `python train.py --tiny` into runs/tiny (a second run starts it over)
#   ./setup.sh --no-demo  the environment only (what .ci/run calls)
# Then the tests in the same environment: source .venv/bin/activate && pytest
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "" | --no-demo) ;;
  *) echo "error: ./setup.sh $1: the one option is --no-demo" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v nvidia-smi > /dev/null; then  # no GPU: PyPI's Linux torch wheel is the multi-GB CUDA build
  # short timeouts: where that index is unreachable (an offline mirror, CI) pip takes the wheel its own config finds
  pip install -q --timeout 15 --retries 1 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
pip install -q -r requirements.txt
if command -v nvidia-smi > /dev/null; then
  echo "a GPU machine: for flash-attn also run  source .venv/bin/activate && pip install -r requirements-gpu.txt --no-build-isolation"
fi
if [ "${1:-}" != --no-demo ]; then
  python train.py --tiny --overwrite_output_dir
fi
