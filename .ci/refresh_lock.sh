#!/usr/bin/env bash
# 用范围允许的最新版本建一个新环境、跑测试；通过后重写锁文件。
# A fresh environment with the newest versions requirements.txt allows, the suite run in it, and on success the
# lock files rewritten (requirements-lock.txt, requirements-dev-lock.txt): the one command that refreshes the lock.
#   bash .ci/refresh_lock.sh            full suite, then the lock is written (commit it with the suite's result)
#   bash .ci/refresh_lock.sh --check    CI: the fast tests only (-m "not slow"), the lock untouched; a new release
#                                       that breaks us shows up as a red run here, not as a user's traceback
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1; fi
NEWEST_VENV="${NEWEST_VENV:-$PWD/.venv-newest}"
rm -rf "$NEWEST_VENV"
(
    unset VIRTUAL_ENV
    export VENV_DIR="$NEWEST_VENV" NEWEST=1 WITH_DEV=1
    # shellcheck disable=SC1091
    source ./setup_env.sh
    echo "== 与锁文件不同的版本 / versions that differ from the lock =="
    python - <<'PY'
from importlib import metadata
import re
locked = {}
for name in ("requirements-lock.txt", "requirements-dev-lock.txt"):
    for line in open(name, encoding="utf-8"):
        if "==" in line and not line.startswith("#"):
            n, v = line.strip().split("==")
            locked[re.sub(r"[-_.]+", "-", n).lower()] = v
for d in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
    n = re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()
    if n in locked and locked[n] != d.version:
        print(f"  {d.metadata['Name']}: {locked[n]} -> {d.version}")
    elif n not in locked and n != "chatglm3-finetune":
        print(f"  {d.metadata['Name']}: new, {d.version}")
PY
    if [ "$CHECK" = 1 ]; then
        python -m pytest -q -m "not slow" tests
    else
        python -m pytest -q tests
        python .ci/write_lock.py
    fi
)
