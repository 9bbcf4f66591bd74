"""Writes requirements-lock.txt (what requirements.txt resolves to, torch included) and requirements-dev-lock.txt (what
requirements-dev.txt adds) from the active environment: every installed package in the dependency closure of the
two files, at its exact version. Run by .ci/refresh_lock.sh after the suite passed in that environment."""
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: Path):
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            yield canonical(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0])


def closure(roots, installed):
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for req in installed[name].requires or []:
            if "extra ==" in req:  # optional extras are not installed by a plain requirement
                continue
            todo.append(canonical(re.split(r"[<>=!~\[; (]", req, maxsplit=1)[0]))
    return seen


def write(path: Path, names, installed, header: str):
    lines = [f"{installed[n].metadata['Name']}=={installed[n].version}" for n in sorted(names)]
    path.write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"{path.name}: {len(lines)} packages")


def main() -> int:
    installed = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    runtime = closure(requirement_names(ROOT / "requirements.txt"), installed)
    dev = closure(requirement_names(ROOT / "requirements-dev.txt"), installed) - runtime
    python = ".".join(map(str, sys.version_info[:2]))
    note = ("# 由 `bash .ci/refresh_lock.sh` 生成，勿手改 / written by `bash .ci/refresh_lock.sh`, do not edit: the exact versions\n"
            f"# the whole suite last passed with (Python {python}). setup_env.sh and CI install these; requirements*.txt keep the ranges.\n")
    write(ROOT / "requirements-lock.txt", runtime, installed, note)
    write(ROOT / "requirements-dev-lock.txt", dev, installed, note + "# On top of requirements-lock.txt (tests, plots).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
