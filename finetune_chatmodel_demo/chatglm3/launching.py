"""What the launchers in scripts/ decide before and around a training run (scripts/launch.py is their CLI):

- how many processes (NUM_GPUS, checked; default every visible GPU, 1 on a CPU machine) and how to start them:
  plain python for one process (DeepSpeed then gets the rendezvous variables it would otherwise look for through
  MPI), torchrun for several or for several machines;
- the hardware flags (`--use_cpu`, gloo between CPU processes, `--bf16`/`--fp16` from PRECISION);
- which output folder: with upstream's timestamped names and `--resume_from_checkpoint true`, the newest unfinished
  run of the same name is continued;
- one live run per output folder: an flock on the folder, held by the launcher and inherited by the training, so a
  second run is refused while the first lives and nothing stays locked once it is gone (even after kill -9);
- the log: the training's output goes to the terminal and to OUTPUT_DIR/train.log, and its exit status is returned.
"""
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from .errors import ChatGLMError

TRUE_VALUES = ("true", "yes", "auto", "1")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATESTR_RE = r"\d{8}-\d{6}"  # date +%Y%m%d-%H%M%S, as upstream's launchers name their output folders


class LaunchError(ChatGLMError):
    """A launcher setting that cannot work; one line naming the variable and what to do."""


# --- the finetune.py command line ---------------------------------------------------------------------------------
def flag_value(argv: List[str], flag: str) -> Optional[str]:
    """The value of the last `flag VALUE` or `flag=VALUE` in argv (argparse: the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def with_flag_value(argv: List[str], flag: str, value: str) -> List[str]:
    """argv with every value of `flag` replaced."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == flag and i + 1 < len(out):
            out[i + 1] = value
        elif arg.startswith(flag + "="):
            out[i] = f"{flag}={value}"
    return out


# --- processes and hardware ---------------------------------------------------------------------------------------
def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def positive_int(name: str, value: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", value) or int(value) < 1:
        raise LaunchError(f"错误：{name} 应为正整数，收到 {value!r} / Error: {name} must be a positive integer, got {value!r}")
    return int(value)


def process_count(value: str, gpus: int) -> int:
    """NUM_GPUS: empty = every visible GPU (1 on a CPU machine, where it counts CPU processes)."""
    if not value.strip():
        return max(gpus, 1)
    if gpus and positive_int("NUM_GPUS", value) > gpus:
        raise LaunchError(f"错误：NUM_GPUS={value}，但本机只有 {gpus} 块可见 GPU / Error: NUM_GPUS={value} but only {gpus} GPUs "
                          "are visible (CUDA_VISIBLE_DEVICES)")
    return positive_int("NUM_GPUS", value)


def hardware_flags(argv: List[str], precision: str, gpus: int, processes: int) -> List[str]:
    """Flags finetune.py needs on this machine: --use_cpu and gloo without GPUs, and the precision from PRECISION.
    auto: on a GPU, for DeepSpeed full fine-tuning, bf16 where the GPU has it, else fp16 (P-Tuning and LoRA pick
    the frozen weights' precision themselves); on the CPU bf16 mixed precision where the CPU does bf16 arithmetic
    (loading.cpu_has_bf16; measured faster with the same loss curve, README: precision), except under DeepSpeed,
    else fp32. A --bf16 or
    --fp16 already in the flags wins."""
    if precision not in PRECISIONS:
        raise LaunchError(f"错误：PRECISION 只能是 {' / '.join(PRECISIONS)}，收到 {precision!r} / Error: PRECISION must be one of "
                          f"{', '.join(PRECISIONS)}, got {precision!r}")
    from .loading import cpu_has_bf16, resolve_dtype

    given = bool({"--bf16", "--fp16"} & set(argv))
    if not gpus:
        if precision == "fp16":
            raise LaunchError("错误：PRECISION=fp16 需要 CUDA GPU（CPU 没有 fp16 运算）；CPU 上请用 PRECISION=bf16 或 auto / "
                              "Error: PRECISION=fp16 needs a CUDA GPU (CPUs have no fp16 arithmetic): use PRECISION=bf16 "
                              "or auto on the CPU")
        cpu = ["--use_cpu"] + (["--ddp_backend", "gloo"] if processes > 1 else [])
        if precision == "auto":  # DeepSpeed's bf16 on the CPU (bf16 weights, float32 master copy) was not measured
            precision = "bf16" if cpu_has_bf16() and flag_value(argv, "--deepspeed") is None else "fp32"
        return cpu + ([] if given or precision == "fp32" else [f"--{precision}"])
    if flag_value(argv, "--deepspeed") is None or given:
        return []
    if precision == "auto":  # the same rule as loading a model for inference
        import torch

        precision = "bf16" if resolve_dtype(None, "cuda") == torch.bfloat16 else "fp16"
    return [] if precision == "fp32" else [f"--{precision}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(processes: int, nnodes: int, node_rank: int, master_addr: str, master_port: str) -> List[str]:
    """One process: plain python (errors stay one line). Several: torchrun (--standalone picks a free port)."""
    if processes == 1 and nnodes == 1:
        return [sys.executable]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    if nnodes == 1:
        return run + ["--standalone", "--nnodes", "1"]
    return run + ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", master_addr,
                  "--master_port", master_port]


def single_process_env(env: dict) -> dict:
    """The rendezvous variables torchrun would set, for a lone process: DeepSpeed needs them (without them it
    looks for MPI and fails on `No module named 'mpi4py'`)."""
    env = dict(env)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env["MASTER_PORT"] = env.get("MASTER_PORT") or str(free_port())
    return env


# --- output folders -----------------------------------------------------------------------------------------------
def lock(folder: Path) -> Optional[int]:
    """An fd holding an exclusive flock on `folder`, or None when a live run holds it. The lock lives as long as
    any process holding the fd (the launcher, the training it starts) and vanishes with them."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_finished(run: Path) -> bool:
    """finetune.py writes trainer_state.json into the output folder itself only when training has ended."""
    return (run / "trainer_state.json").is_file()


def has_checkpoint(run: Path) -> bool:
    return any((c / "trainer_state.json").is_file() for c in run.glob("checkpoint-*"))


def unfinished_run(output_dir: Path, datestr: str) -> Optional[Path]:
    """For a default (timestamped) output folder: the newest other run of the same name, any timestamp, that
    stopped before the end with a checkpoint to continue from and no live process."""
    if not datestr or datestr not in output_dir.name or not output_dir.parent.is_dir():
        return None
    head, _, tail = output_dir.name.partition(datestr)
    pattern = re.compile(re.escape(head) + DATESTR_RE + re.escape(tail) + "$")
    candidates = sorted((p for p in output_dir.parent.iterdir() if p.is_dir() and pattern.match(p.name)), reverse=True)
    for run in candidates:
        if is_finished(run) or not has_checkpoint(run):
            continue
        fd = lock(run)
        if fd is None:
            print(f"{run} 正在被另一个运行使用，跳过 / is in use by a live run, skipped", flush=True)
            continue
        os.close(fd)
        return run
    return None


def choose_output_dir(argv: List[str], datestr: str) -> Path:
    output_dir = Path(flag_value(argv, "--output_dir") or "output").absolute()
    resume = (flag_value(argv, "--resume_from_checkpoint") or "").strip().lower() in TRUE_VALUES
    if resume and not output_dir.exists():
        earlier = unfinished_run(output_dir, datestr)
        if earlier is not None:
            print(f"继续未完成的运行 / Continuing the unfinished run {earlier} (RESUME=true; set OUTPUT_DIR for a "
                  "fresh one, or RESUME=false)", flush=True)
            return earlier
    return output_dir


def check_inputs(argv: List[str]) -> None:
    """Fail in a second, before any process starts, on a missing data file or model (a Hub id is fetched here,
    once, instead of by every process)."""
    from . import hub

    train_file = flag_value(argv, "--train_file")
    if train_file is not None and not Path(train_file).is_file():
        raise LaunchError(f"错误：找不到训练数据 {Path(train_file).absolute()}（DATASET_PATH）/ Error: training data "
                          f"{Path(train_file).absolute()} not found (DATASET_PATH): run the format script first")
    model = flag_value(argv, "--model_name_or_path")
    if model is not None:
        hub.resolve(model, revision=flag_value(argv, "--model_revision"), cache_dir=flag_value(argv, "--cache_dir"),
                    label="BASE_MODEL_PATH")


def claim(output_dir: Path) -> int:
    """Create the output folder and lock it for this run; refuse one a live run holds."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaunchError(f"错误：无法创建输出目录 {output_dir}（OUTPUT_DIR）/ Error: cannot create the output folder "
                          f"{output_dir} (OUTPUT_DIR): {e.strerror}") from None
    fd = lock(output_dir)
    if fd is None:
        raise LaunchError(f"错误：{output_dir} 正被另一个训练使用；等它结束，或换一个 OUTPUT_DIR / Error: {output_dir} is in use "
                          "by another training run: wait for it to end, or set another OUTPUT_DIR")
    return fd


def run_logged(command: List[str], env: dict, log_file: Path, keep_fds=()) -> int:
    """Run `command`, its output to the terminal and appended to `log_file`; its exit status."""
    with open(log_file, "ab") as log:
        def both(data: bytes):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            log.write(data)
            log.flush()

        both(("+ " + " ".join(command) + "\n").encode())
        child = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, pass_fds=tuple(keep_fds))
        # Ctrl-C reaches the training directly (same process group); the launcher keeps copying its last words.
        # A SIGTERM sent to the launcher alone is passed on.
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
        for chunk in iter(lambda: child.stdout.read1(1 << 16), b""):
            both(chunk)
        return child.wait()
