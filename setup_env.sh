# shellcheck shell=bash
# 由 quickstart.sh 和 .ci/run 引用（source）：准备 Python 虚拟环境并安装缺少的依赖。
# Sourced by quickstart.sh and .ci/run: activate (or create) a virtual environment and install what is missing.
#   VENV_DIR     where to create the venv when none is active (default: .venv in the repository)
#   TORCH_SPEC   the torch to install when none is installed (default torch==2.13.0, falling back to torch>=2.1;
#                GPU users install their CUDA build of torch first, see https://pytorch.org)
#   WITH_DEV=1   also install requirements-dev.txt (pytest, matplotlib)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ -z "${VIRTUAL_ENV:-}" ]; then
    VENV_DIR="${VENV_DIR:-$ROOT/.venv}"
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        PY="${PYTHON:-python3}"
        if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "错误：需要 Python 3.10 或更新版本 / Error: Python 3.10 or newer is needed (tried $PY)" >&2
            exit 1
        fi
        echo "创建虚拟环境 / creating a virtual environment: $VENV_DIR"
        "$PY" -m venv "$VENV_DIR"
    fi
    # shellcheck disable=SC1091
    . "$VENV_DIR/bin/activate"
fi

if ! python -c "import torch" 2>/dev/null; then
    echo "安装 PyTorch / installing PyTorch (${TORCH_SPEC:-torch==2.13.0})"
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" || python -m pip install -q "torch>=2.1"
fi
REQS=(-r "$ROOT/requirements.txt")
CHECK="import transformers, sentencepiece, safetensors, accelerate, deepspeed, numpy, tqdm, jieba, rouge_chinese, nltk, peft, bitsandbytes, gguf, huggingface_hub, fastapi, uvicorn, pydantic"
if [ "${WITH_DEV:-0}" = 1 ]; then
    REQS+=(-r "$ROOT/requirements-dev.txt")
    CHECK="$CHECK, pytest, matplotlib, openai, selenium, llama_cpp"
fi
if ! python -c "$CHECK" >/dev/null 2>&1; then
    echo "安装依赖 / installing requirements"
    if [ "${WITH_DEV:-0}" = 1 ] && ! python -c "import llama_cpp" 2>/dev/null; then
        echo "  其中 llama-cpp-python 从源码编译 llama.cpp，2 核约 30 分钟 / llama-cpp-python compiles llama.cpp from source: about 30 min on 2 cores"
    fi
    python -m pip install -q "${REQS[@]}"
fi
