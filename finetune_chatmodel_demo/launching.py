"""What the launchers in scripts/ decide before and around a training run (scripts/launch.py is their CLI):

- how many processes (NUM_GPUS, checked; default every visible GPU, 1 on a CPU machine) and how to start them:
  plain python for one process (DeepSpeed then gets the rendezvous variables it would otherwise look for through
  MPI), torchrun for several or for several machines;
- the hardware flags (`--use_cpu`, gloo between CPU processes, `--bf16`/`--fp16` from PRECISION);
- which output folder: with upstream's timestamped names and `--resume_from_checkpoint true`, the newest unfinished
  run of the same name is continued;
- one live run per output folder: `claim` locks OUTPUT_DIR/.lock (the `filelock` package: flock on Unix,
  msvcrt on Windows, released by the OS when the process dies, even after kill -9). finetune.py takes it for the
  run's life, whoever starts it; the launcher only tries it (`check_free`) to refuse in a second, before any
  process starts, and leaves it to its training;
- the training files: DATASET_PATH (one file, or several comma-separated) and DATASET_WEIGHTS (one weight each);
- the numbers of a launch: NUM_GPUS (at most the visible GPUs, or the CPU cores), NNODES, NODE_RANK, MASTER_PORT
  and every numeric finetune.py flag the launcher passes (LR, LORA_ALPHA, ...; chatglm3.limits), named by its
  variable; a DeepSpeed config's numbers;
- which checkpoint a resume continues from (`find_last_checkpoint`, used by finetune.py and by the launcher);
- the log: the training's output goes to the terminal and to OUTPUT_DIR/train.log, and its exit status is returned.
"""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from filelock import FileLock, Timeout

from chatglm3 import json_files, limits
from chatglm3.data import reader
from chatglm3.errors import ChatGLMError
from chatglm3.checkpoint.torch_files import TRAINER_STATE_NAME, CorruptFileError, verify_checkpoint

TRUE_VALUES = ("true", "yes", "auto", "1")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATESTR_RE = r"\d{8}-\d{6}"  # date +%Y%m%d-%H%M%S, as upstream's launchers name their output folders
LOCK_NAME = ".lock"  # in the output folder; left beside a run's files, harmless: the lock is the OS's, not the file
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# The launchers' variables, by the finetune.py flag each becomes: a bad value is named as the user typed it.
LAUNCHER_VARIABLES = {
    "--learning_rate": "LR", "--lora_rank": "LORA_RANK", "--lora_alpha": "LORA_ALPHA", "--lora_dropout": "LORA_DROPOUT",
    "--pre_seq_len": "PRE_SEQ_LEN", "--max_seq_length": "MAX_SEQ_LEN", "--max_source_length": "MAX_SOURCE_LEN",
    "--max_target_length": "MAX_TARGET_LEN", "--per_device_train_batch_size": "DEV_BATCH_SIZE",
    "--per_device_eval_batch_size": "DEV_BATCH_SIZE", "--gradient_accumulation_steps": "GRAD_ACCUMULATION_STEPS",
    "--max_steps": "MAX_STEP", "--save_steps": "SAVE_INTERVAL", "--logging_steps": "LOG_INTERVAL",
}


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


def cpu_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_count(value: str, gpus: int) -> int:
    """NUM_GPUS: empty = every visible GPU (1 on a CPU machine, where it counts CPU processes). At most the visible
    GPUs, or the cores on a CPU machine (each CPU process needs a core; more only fight over them)."""
    if not value.strip():
        return max(gpus, 1)
    count = limits.AT_LEAST_1.check("NUM_GPUS", value)
    if gpus and count > gpus:
        raise LaunchError(f"错误：NUM_GPUS={value}，但本机只有 {gpus} 块可见 GPU / Error: NUM_GPUS={value} but only {gpus} GPUs "
                          "are visible (CUDA_VISIBLE_DEVICES)")
    if not gpus and count > cpu_cores():
        raise LaunchError(f"错误：NUM_GPUS={value}，但本机没有 GPU，只有 {cpu_cores()} 个 CPU 核心，每个 CPU 进程至少需要一个 / "
                          f"Error: NUM_GPUS={value} but there is no GPU and only {cpu_cores()} CPU cores; each CPU "
                          "process needs one")
    return count


def node_settings(env) -> tuple:
    """(NNODES, NODE_RANK, MASTER_PORT) from the environment, checked: torchrun would fail on them with a traceback
    or wait for nodes that never come."""
    nnodes = limits.AT_LEAST_1.check("NNODES", env.get("NNODES") or "1")
    node_rank = limits.Limit(int, low=0, high=nnodes - 1).check("NODE_RANK", env.get("NODE_RANK") or "0")
    port = limits.PORT.check("MASTER_PORT", env.get("MASTER_PORT") or "29500")
    return nnodes, node_rank, port


def check_numbers(argv: List[str]) -> None:
    """Every numeric finetune.py flag in argv (the value that takes effect: the last) in its range
    (chatglm3.limits.FLAG_LIMITS), named by the launcher variable it comes from."""
    for name, limit in limits.FLAG_LIMITS.items():
        flag = f"--{name}"
        value = flag_value(argv, flag)
        if value is not None:
            variable = LAUNCHER_VARIABLES.get(flag)
            limit.check(f"{variable} ({flag})" if variable else flag, value)


# DeepSpeed settings that are numbers with a range ("auto" leaves them to the Trainer's flags, checked above).
DEEPSPEED_LIMITS = {
    ("train_batch_size",): limits.AT_LEAST_1, ("train_micro_batch_size_per_gpu",): limits.AT_LEAST_1,
    ("gradient_accumulation_steps",): limits.AT_LEAST_1, ("gradient_clipping",): limits.NON_NEGATIVE,
    ("optimizer", "params", "lr"): limits.NON_NEGATIVE, ("optimizer", "params", "weight_decay"): limits.NON_NEGATIVE,
    ("optimizer", "params", "eps"): limits.POSITIVE, ("zero_optimization", "stage"): limits.Limit(int, low=0, high=3),
    ("scheduler", "params", "warmup_max_lr"): limits.NON_NEGATIVE,
    ("scheduler", "params", "warmup_min_lr"): limits.NON_NEGATIVE,
    ("scheduler", "params", "warmup_num_steps"): limits.AT_LEAST_0,
}


def check_deepspeed_config(path: Optional[str], label: str) -> None:
    """A --deepspeed file (DS_CONFIG): a JSON object (chatglm3.json_files: no NaN or Infinity) whose numeric
    settings are in range. One line naming the file and the setting otherwise; nothing starts."""
    if path is None:
        return
    config = json_files.read_json(path)
    for keys, limit in DEEPSPEED_LIMITS.items():
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and value != "auto":
            limit.check(f"{label} {path}: {'.'.join(keys)}", value)


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
    from chatglm3.checkpoint.loading import cpu_has_bf16, resolve_dtype

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
def make_repeatable(seed: int) -> None:
    """`--full_determinism` (transformers' flag): a seeded run repeats itself exactly on one machine, with the same
    number of threads. transformers' enable_full_determinism (seeds, torch.use_deterministic_algorithms, cuDNN) and
    what it leaves out on the CPU: oneDNN's deterministic mode (its kernels may otherwise sum in an order that
    thread timing decides) and MKL's conditional numerical reproducibility (MKL_CBWR, MKL_DYNAMIC: read at MKL's
    first call, which has not happened yet when finetune.py calls this). Its cost: docs/training.md."""
    import torch
    from transformers.trainer_utils import enable_full_determinism

    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    os.environ.setdefault("OMP_DYNAMIC", "FALSE")
    enable_full_determinism(seed)
    torch.backends.mkldnn.deterministic = True


def is_finished(run: Path) -> bool:
    """finetune.py writes trainer_state.json into the output folder itself only when training has ended."""
    return (run / TRAINER_STATE_NAME).is_file()


def find_last_checkpoint(output_dir) -> Optional[Path]:
    """The `checkpoint-N` with the largest N in `output_dir` that is complete (trainer_state.json, written last)
    and whole (every file it holds reads back: chatglm3.checkpoint.torch_files.verify_checkpoint), or None. A damaged one is
    reported and skipped for the one before; one holding code (UnsafeFileError) stops the run."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            if (path / TRAINER_STATE_NAME).is_file():
                complete.append((int(match.group(1)), path))
            else:
                print(f"跳过不完整的检查点 {path}（缺少 {TRAINER_STATE_NAME}）/ "
                      f"Skipping incomplete checkpoint {path} (no {TRAINER_STATE_NAME})", flush=True)
    for _, path in sorted(complete, reverse=True):
        try:
            verify_checkpoint(path)
        except CorruptFileError as e:
            print(f"跳过损坏的检查点 / Skipping the damaged checkpoint {path}: {e}", flush=True)
            continue
        return path
    return None


def unfinished_run(output_dir: Path, datestr: str) -> Optional[Path]:
    """For a default (timestamped) output folder: the newest other run of the same name, any timestamp, that
    stopped before the end with a checkpoint to continue from and no live process."""
    if not datestr or datestr not in output_dir.name or not output_dir.parent.is_dir():
        return None
    head, _, tail = output_dir.name.partition(datestr)
    pattern = re.compile(re.escape(head) + DATESTR_RE + re.escape(tail) + "$")
    candidates = sorted((p for p in output_dir.parent.iterdir() if p.is_dir() and pattern.match(p.name)), reverse=True)
    for run in candidates:
        if is_finished(run) or find_last_checkpoint(run) is None:
            continue
        if not is_free(run):
            print(f"{run} 正在被另一个运行使用，跳过 / is in use by a live run, skipped", flush=True)
            continue
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


def check_before_launch(argv: List[str]) -> None:
    """Fail in a second, before any process starts, on a number out of range, a bad DS_CONFIG, a missing data
    file or model (a Hub id is fetched here, once, instead of by every process)."""
    from chatglm3 import hub

    check_numbers(argv)
    check_deepspeed_config(flag_value(argv, "--deepspeed"), "DS_CONFIG (--deepspeed)")
    train_file = flag_value(argv, "--train_file")
    files = reader.split_files(train_file) if train_file is not None else []
    for path in files:
        if not Path(path).is_file():
            raise LaunchError(f"错误：找不到训练数据 {Path(path).absolute()}（DATASET_PATH）/ Error: training data "
                              f"{Path(path).absolute()} not found (DATASET_PATH): run the format script first")
    # DATASET_PATH=a.jsonl,b.jsonl with DATASET_WEIGHTS=3,1: one positive weight per file
    reader.parse_weights(flag_value(argv, "--train_weights"), len(files), "DATASET_WEIGHTS (--train_weights)",
                         "DATASET_PATH (--train_file)")
    model = flag_value(argv, "--model_name_or_path")
    if model is not None:
        hub.resolve(model, revision=flag_value(argv, "--model_revision"), cache_dir=flag_value(argv, "--cache_dir"),
                    label="BASE_MODEL_PATH")


def make_folder(output_dir, label: str = "OUTPUT_DIR") -> Path:
    """The output folder, created if need be; one line naming `label` when it cannot be (a file is in the way,
    no permission, a read-only disk)."""
    output_dir = Path(output_dir).absolute()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaunchError(f"错误：无法创建输出目录 {output_dir}（{label}）：{e.strerror or e} / Error: cannot create the "
                          f"output folder {output_dir} ({label}): {e.strerror or e}") from None
    return output_dir


def claim(output_dir, label: str = "OUTPUT_DIR") -> FileLock:
    """Create the output folder and lock it for this process (release() or the process's end frees it); refuse a
    folder a live run holds, or one that cannot be written (read-only, a file), in one line naming `label`."""
    output_dir = make_folder(output_dir, label)
    lock = FileLock(output_dir / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
        with tempfile.TemporaryFile(dir=output_dir):  # the lock file may be left from a run when it was writable
            pass
    except Timeout:
        raise LaunchError(f"错误：{output_dir}（{label}）正被另一个训练使用；等它结束，或换一个输出目录 / Error: {output_dir} "
                          f"({label}) is in use by another training run: wait for it to end, or choose another "
                          "folder") from None
    except OSError as e:
        lock.release()
        raise LaunchError(f"错误：无法在输出目录 {output_dir}（{label}）中写入：{e.strerror or e} / Error: cannot write into the "
                          f"output folder {output_dir} ({label}): {e.strerror or e}") from None
    return lock


@contextlib.contextmanager
def holding(output_dir, label: str):
    """`claim` for the block (finetune.py's run). A folder the block created and left holding only the lock file
    (a run refused by a later check) is removed again: a mistake leaves nothing behind."""
    output_dir = Path(output_dir).absolute()
    existed = output_dir.exists()
    lock = claim(output_dir, label)
    try:
        yield
    finally:
        lock.release()
        if not existed and [p.name for p in output_dir.iterdir()] == [LOCK_NAME]:
            with contextlib.suppress(OSError):  # another run may have taken the folder meanwhile: leave it
                (output_dir / LOCK_NAME).unlink()
                output_dir.rmdir()


def is_free(folder: Path) -> bool:
    """Whether no live run holds `folder` (tried and let go at once)."""
    try:
        claim(folder).release()
    except LaunchError:
        return False
    return True


def check_free(output_dir: Path) -> None:
    """The launcher's check before anything starts: OUTPUT_DIR can be created, written and locked. The lock is
    let go again: the training takes it for its life (a lock the launcher kept would refuse its own child)."""
    claim(output_dir).release()


def run_logged(command: List[str], env: dict, log_file: Path) -> int:
    """Run `command`, its output to the terminal and appended to `log_file`; its exit status."""
    with open(log_file, "ab") as log:
        def both(data: bytes):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            log.write(data)
            log.flush()

        both(("+ " + " ".join(command) + "\n").encode())
        child = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        # Ctrl-C reaches the training directly (same process group); the launcher keeps copying its last words.
        # A SIGTERM sent to the launcher alone is passed on.
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
        for chunk in iter(lambda: child.stdout.read1(1 << 16), b""):
            both(chunk)
        return child.wait()
