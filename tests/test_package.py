"""The library as a package: pyproject.toml installs chatglm3 with every sub-package (and nothing of the drop-in
folder's scripts), and the folders find each other without sys.path edits beyond the two guarded ones."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "finetune_chatmodel_demo" / "chatglm3"


@pytest.mark.slow
def test_pyproject_installs_the_library_and_only_it(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    installed = {p.relative_to(target).as_posix() for p in (target / "chatglm3").rglob("*.py")}
    in_repo = {p.relative_to(LIBRARY.parent).as_posix() for p in LIBRARY.rglob("*.py")}
    assert installed == in_repo  # every module of every sub-package, nothing missing from pyproject's list
    assert not [p.name for p in target.iterdir() if p.suffix == ".py"]  # no cli.py, metrics.py, finetune.py ...
    code = ("import chatglm3, pkgutil, importlib; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(chatglm3.__path__, 'chatglm3.')]; "
            "from chatglm3 import ChatGLMForConditionalGeneration, ChatGLMTokenizer; print(chatglm3.__file__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(target))


def test_sys_path_is_edited_in_two_guarded_places_only():
    """The project's folders are stitched together in two guarded places: the drop-in folder's scripts/_bootstrap.py
    (the folder copied alone, nothing installed) and benchmarks/_common.py (the benchmarks reuse the drop-in folder's
    data collators and the tiny-model builder); everything else imports the installed package or its own folder.
    Apart from those, the tool plug-in loader (chatglm3/tools.py) appends a user's tool file's own folder, as Python
    does for a script it runs, so that a plug-in can import the modules beside it."""
    edits = []
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if parts[0] in {"tests", ".venv", ".venv-newest", "build"} or "quickstart_out" in parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"sys\.path(\.insert|\.append|\[:0\]\s*=|\s*=)", line):
                edits.append(f"{path.relative_to(REPO)}:{number}")
    stitching = [e for e in edits if not e.startswith("finetune_chatmodel_demo/chatglm3/tools.py:")]
    assert {e.split(":")[0] for e in stitching} <= {"finetune_chatmodel_demo/scripts/_bootstrap.py",
                                                     "benchmarks/_common.py"}, edits
    assert len(stitching) <= 2 and len(edits) - len(stitching) <= 1, edits
