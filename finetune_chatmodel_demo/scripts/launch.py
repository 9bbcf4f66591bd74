#!/usr/bin/env python
"""启动脚本的公共部分 / What every launcher in scripts/ runs: checks the settings, picks and locks the output
folder, starts finetune.py in as many processes as asked, keeps the log.

    python scripts/launch.py --num-gpus "$NUM_GPUS" --datestr "$DATESTR" -- finetune.py --output_dir ... ARGS

- NUM_GPUS: empty = every visible GPU (1 on a machine without one, where it counts CPU processes).
- One process runs as plain python, several under torchrun; several machines: NNODES, NODE_RANK, MASTER_ADDR,
  MASTER_PORT (read from the environment, as torchrun names them).
- Hardware flags are appended and shown: --use_cpu (and gloo between CPU processes) without a GPU; --bf16 or
  --fp16 from PRECISION: auto = on a GPU for DeepSpeed full fine-tuning bf16 where the GPU supports it, else fp16;
  on the CPU bf16 mixed precision where the CPU has bf16 arithmetic (AVX512-BF16/AMX) and no DeepSpeed,
  else fp32. fp16 needs a GPU.
- Every number is checked before anything starts (NUM_GPUS at most the visible GPUs or CPU cores, NNODES,
  NODE_RANK, MASTER_PORT, and the numeric finetune.py flags, named by their variable: LR, LORA_ALPHA, MAX_STEP, ...),
  and DS_CONFIG's settings; DATASET_PATH may name several files, comma-separated, with DATASET_WEIGHTS (one
  positive weight each, `--train_weights`): every file must exist and the weights match them.
- `--output_dir` is locked for the run's life by finetune.py (a second run with the same folder, launched or
  not, is refused; the launcher refuses it before starting anything); when its name holds
  --datestr (the launchers' timestamped default) and `--resume_from_checkpoint` is true, the newest unfinished run
  of the same name is continued instead of starting a new folder.
- The output goes to the terminal and to OUTPUT_DIR/train.log; the exit status is the training's (2: a setting
  that cannot work, one line on stderr).
"""
import argparse
import os
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (puts the drop-in folder first on sys.path)

from chatglm3 import ChatGLMError  # noqa: E402
import launching  # noqa: E402


def parse_args(argv=None):
    # No abbreviations: "--num-gpu 2" must not pass for --num-gpus (the launcher reads flags by their full name).
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--num-gpus", default=os.environ.get("NUM_GPUS", ""), help="NUM_GPUS (default: visible GPUs)")
    parser.add_argument("--datestr", default="", help="the timestamp in the default OUTPUT_DIR")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- finetune.py and its flags")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("需要 -- finetune.py ARGS / expected -- finetune.py ARGS")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    script, *train_args = args.command
    env = os.environ
    try:
        gpus = launching.visible_gpus()
        processes = launching.process_count(args.num_gpus, gpus)
        nnodes, node_rank, master_port = launching.node_settings(env)
        launching.check_before_launch(train_args)
        output_dir = launching.choose_output_dir(train_args, args.datestr)
        train_args = launching.with_flag_value(train_args, "--output_dir", str(output_dir))
        # Every node of a multi-machine run may share the folder; the first one's training holds the lock.
        if node_rank == 0:
            launching.check_free(output_dir)
        else:
            launching.make_folder(output_dir)
        train_args += launching.hardware_flags(train_args, env.get("PRECISION") or "auto", gpus, processes * nnodes)
        command = launching.launch_prefix(processes, nnodes, node_rank, env.get("MASTER_ADDR", "127.0.0.1"),
                                          str(master_port)) + [script] + train_args
        run_env = dict(env)
        if processes * nnodes == 1 and launching.flag_value(train_args, "--deepspeed") is not None:
            run_env = launching.single_process_env(run_env)
    except ChatGLMError as e:
        print(e, file=sys.stderr)
        return 2
    log_file = output_dir / "train.log"
    print(f"输出目录 / output dir: {output_dir} ; 日志 / log: {log_file}", flush=True)
    status = launching.run_logged(command, run_env, log_file)
    if status:
        print(f"训练失败，退出码 {status}，日志见 {log_file} / Training failed with exit status {status}, see {log_file}",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
