# shellcheck shell=bash
# 由 quickstart.sh 和 .ci/run 引用（source）：准备 Python 虚拟环境并安装缺少的依赖。
# Sourced by quickstart.sh and .ci/run: activate (or create) a virtual environment and install what is missing.
#   VENV_DIR     where to create the venv when none is active (default: .venv in the repository)
#   TORCH_SPEC   the torch to install when none is installed (default torch==2.13.0, falling back to torch>=2.1;
#                GPU users install their CUDA build of torch first, see https://pytorch.org)
#   WITH_DEV=1   also install the test and plot packages (requirements-dev-lock.txt)
#   NEWEST=1     install the newest versions requirements*.txt allow instead of the lock (what .ci/refresh_lock.sh does)
# The lock (requirements-lock.txt, requirements-dev-lock.txt) holds the exact versions the suite last passed with;
# torch comes from TORCH_SPEC (a GPU user's CUDA build is kept), the library itself is installed editable (pip -e .).
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
# Installed once per lock: a stamp in the environment records the lock, the options and this checkout, so the
# scripts that source this file (quickstart.sh, tool_demo.sh) do not run pip each time.
STAMP="${VIRTUAL_ENV:+$VIRTUAL_ENV/.chatglm3-installed}"
WANT="$(cat "$ROOT/requirements-lock.txt" "$ROOT/requirements-dev-lock.txt" | cksum) $ROOT dev=${WITH_DEV:-0} newest=${NEWEST:-0}"
DONE="$(cat "$STAMP" 2>/dev/null || true)"  # an install with the dev packages serves one without them too
# NEWEST=1 upgrades every time it is asked for directly (bash setup_env.sh); the scripts that source this file under
# NEWEST=1 (tool_demo.sh in .ci/refresh_lock.sh's tests) find the stamp and do not reinstall.
if { [ "${NEWEST:-0}" = 1 ] && [ "${BASH_SOURCE[0]}" = "$0" ]; } || [ -z "$STAMP" ] || { [ "$DONE" != "$WANT" ] && [ "$DONE" != "${WANT/dev=0/dev=1}" ]; }; then
    if [ "${NEWEST:-0}" = 1 ]; then
        # Newest of everything but torch: the installed build stays (a bare upgrade would pull a multi-GB CUDA build).
        LOCK="$(mktemp)"
        python -c "import torch; print('torch==' + torch.__version__)" > "$LOCK"
        REQS=(-U -r "$ROOT/requirements.txt" -c "$LOCK")
        if [ "${WITH_DEV:-0}" = 1 ]; then REQS+=(-r "$ROOT/requirements-dev-lock.txt"); fi
    else
        # torch is left out of the lock here: TORCH_SPEC installed it above (or the user's own CUDA build is kept).
        LOCK="$(mktemp)"
        grep -hv '^torch==' "$ROOT/requirements-lock.txt" > "$LOCK"
        if [ "${WITH_DEV:-0}" = 1 ]; then grep -hv '^torch==' "$ROOT/requirements-dev-lock.txt" >> "$LOCK"; fi
        REQS=(-r "$LOCK")
    fi
    if [ "${WITH_DEV:-0}" = 1 ] && ! python -c "import llama_cpp" 2>/dev/null; then
        echo "  其中 llama-cpp-python 从源码编译 llama.cpp，2 核约 30 分钟 / llama-cpp-python compiles llama.cpp from source: about 30 min on 2 cores"
    fi
    echo "安装依赖 / installing requirements ($([ "${NEWEST:-0}" = 1 ] && echo "newest in range" || echo "locked versions"))"
    python -m pip install -q "${REQS[@]}"
    if [ -n "${LOCK:-}" ]; then rm -f "$LOCK"; fi
    # The library (finetune_chatmodel_demo/chatglm3) as an editable package: data_processing/, benchmarks/ and
    # scripts/ import it from anywhere; the drop-in folder's own scripts use their folder's copy.
    python -m pip install -q --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null || python -m pip install -q --no-deps -e "$ROOT"
    if [ -n "$STAMP" ]; then echo "$WANT" > "$STAMP"; fi
fi
