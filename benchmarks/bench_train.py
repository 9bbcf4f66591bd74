"""Training throughput of the batching strategies, side by side on the same machine, model and data.

Strategies (every one trains each sample of the data exactly once per epoch):
  pad_to_max           upstream's recipe: every sample padded to --max-seq-length, and the loss computed the
                       upstream way (float32 logits over the whole vocabulary at every position, then
                       cross-entropy). The baseline of the ratios.
  pad_to_max_our_loss  the same batches, with the model's own loss (output layer only on labelled positions):
                       separates the loss effect from the padding effect.
  dynamic              padded to the batch's longest sample (multiple of 8).
  grouped              dynamic padding over length-grouped batches (transformers' LengthGroupedSampler, as
                       finetune.py --group_by_length uses).
  packing              several conversations per row (pack_samples, as finetune.py --packing): attention within
                       each conversation (per conversation on the CPU, a block-diagonal mask on a GPU), positions
                       restarting per conversation, the P-Tuning prefix seen by all.

Each strategy runs in its own forked process (so its peak memory is its own), and the processes take steps in
turn (so a change in the machine's load touches every strategy alike): warm-up steps, then timed steps, with
batches picked evenly across the epoch. Figures: median over the timed steps of useful (non-padding) tokens/s and
padded tokens/s; padding share; peak memory (GPU: max allocated; CPU: the process's RSS high-water mark
during the steps); mean loss of the timed steps; useful tokens/s relative to pad_to_max.

    python benchmarks/bench_train.py                  # the default CPU shape, P-Tuning v2 (pre_seq_len 16)
    python benchmarks/bench_train.py --full --json    # full fine-tuning; last line = one JSON object
"""
import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common  # noqa: E402  (puts finetune_chatmodel_demo/ on sys.path)
import _docs  # noqa: E402
from _common import BenchError, ChatGLMError, progress  # noqa: E402

import torch  # noqa: E402
from _strategies import BASELINE, STRATEGIES, batch_counts, epoch_batches, spread, strategy_loss  # noqa: E402

from preprocess_utils import build_dataset  # noqa: E402

JSON_KEYS = ("useful_tokens_per_s", "padded_tokens_per_s", "padding_share", "peak_mem_mb", "loss", "ratio_to_pad_to_max", "gflops_per_s")
# Operator kinds of the --profile summary, matched on the profiler's operator names.
OP_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise"),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention"),
    "softmax/cross-entropy": ("softmax", "nll_loss", "cross_entropy", "logsumexp", "aten::exp", "aten::amax"),
}


# --- one strategy --------------------------------------------------------------------------------------------------
class StrategyRun:
    """One strategy's model, optimizer and epoch of batches; step() trains on the next picked batch."""

    def __init__(self, strategy: str, items: list[dict], tokenizer, args, device: str, dtype: torch.dtype):
        self.strategy, self.args, self.device = strategy, args, device
        self.batches = epoch_batches(strategy, items, tokenizer, args.batch_size, args.max_seq_length, args.seed)
        self.picks = spread(len(self.batches), args.warmup + args.steps)
        config = _common.model_config(args, pre_seq_len=None if args.full else args.pre_seq_len, vocab_needed=tokenizer.vocab_size)
        self.model = _common.build_model(config, device, dtype, args.seed)
        if args.full:
            self.model.requires_grad_(True)
        if args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr)
        self.timed: list[tuple[float, dict, float, float]] = []  # (seconds, token counts, loss, FLOPs) of each timed step
        self.done = 0
        _common.reset_peak_memory(device)  # the peak covers the training steps (model and batches are resident)

    def _train_step(self, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = strategy_loss(self.strategy, self.model, batch)
        loss.backward()
        self.optimizer.step()
        return loss

    def step(self) -> str:
        index = self.picks[self.done]
        batch = {key: value.to(self.device) for key, value in self.batches[index].items()}
        _common.synchronize(self.device)
        start = time.perf_counter()
        loss = self._train_step(batch)
        _common.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.done += 1
        timed = self.done > self.args.warmup
        if timed:
            flops = _common.step_flops(self.model, self.batches[index], self.args.full, self.strategy == BASELINE)
            self.timed.append((seconds, batch_counts(self.batches[index]), loss.item(), flops))
        return (f"  {self.strategy}: {'step' if timed else 'warm-up'} {self.done}/{len(self.picks)} "
                f"{tuple(batch['input_ids'].shape)} {seconds:.2f}s loss {loss.item():.4f}")

    def profile(self) -> dict:
        """One more step (the first picked batch) under torch.profiler: share of the step's operator time per
        kind of operator, and the costliest operators."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.startswith("cuda")
        batch = {key: value.to(self.device) for key, value in self.batches[self.picks[0]].items()}
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            self._train_step(batch)
            _common.synchronize(self.device)
        times = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) for e in prof.key_averages()}
        total = sum(times.values()) or 1
        kinds = dict.fromkeys([*OP_KINDS, "other"], 0.0)
        for name, t in times.items():
            kind = next((k for k, patterns in OP_KINDS.items() if any(p in name for p in patterns)), "other")
            kinds[kind] += t / total
        top = sorted(times.items(), key=lambda kv: -kv[1])[:5]
        return {"kinds": {k: round(v, 4) for k, v in kinds.items()}, "top": [(name, round(t / total, 4)) for name, t in top]}

    def summary(self) -> dict:
        def rate(kind):
            return statistics.median(counts[kind] / seconds for seconds, counts, _, _ in self.timed)

        useful = sum(counts["useful"] for _, counts, _, _ in self.timed)
        padded = sum(counts["padded"] for _, counts, _, _ in self.timed)
        return {
            "useful_tokens_per_s": rate("useful"),
            "padded_tokens_per_s": rate("padded"),
            "labelled_tokens_per_s": rate("labelled"),
            "padding_share": 1 - useful / padded,
            "peak_mem_mb": _common.peak_memory_mb(self.device),
            "loss": statistics.fmean(loss for _, _, loss, _ in self.timed),
            "step_s": statistics.median(seconds for seconds, _, _, _ in self.timed),
            "gflops_per_s": statistics.median(flops / seconds for seconds, _, _, flops in self.timed) / 1e9,
            "batches_per_epoch": len(self.batches),
            **({"profile": self.profile()} if self.args.profile else {}),
        }


class _Forked:
    """A StrategyRun living in a forked child process, driven over a pipe: its peak memory is its own. The parent
    has run no torch kernels and touched no GPU, which keeps fork safe."""

    def __init__(self, strategy, *run_args):
        self.strategy = strategy
        context = multiprocessing.get_context("fork")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=self._serve, args=(child_conn, strategy, run_args), daemon=True)
        self.process.start()
        child_conn.close()  # only the child holds its end, so the parent sees EOF if the child dies
        self._call(None)  # wait until it is built

    @staticmethod
    def _serve(conn, strategy, run_args):
        try:
            run = StrategyRun(strategy, *run_args)
            conn.send(("ok", None))
            while True:
                command = conn.recv()
                conn.send(("ok", getattr(run, command)()))
                if command == "summary":
                    return
        except torch.cuda.OutOfMemoryError:
            conn.send(("error", "显存不足 / out of GPU memory"))
        except BaseException as e:  # report anything to the parent instead of dying silently
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))

    def _call(self, command):
        if command is not None:
            self.conn.send(command)
        try:
            status, value = self.conn.recv()
        except EOFError:
            status, value = "error", f"子进程退出（可能内存不足）/ the child process died (out of memory?), exit code {self.process.exitcode}"
        if status != "ok":
            self.process.kill()
            raise BenchError(f"错误：策略 {self.strategy} 运行失败 / Error: strategy {self.strategy} failed: {value}")
        return value

    def step(self) -> str:
        return self._call("step")

    def summary(self) -> dict:
        value = self._call("summary")
        self.process.join()
        return value


def run_strategies(strategies, items, tokenizer, args, device, dtype) -> dict:
    """Build every strategy's run, then step them in turn (one step of each, repeated), so that a change in
    the machine's load during the benchmark touches all strategies alike."""
    runs = {}
    for i, strategy in enumerate(strategies, 1):
        progress(f"[{i}/{len(strategies)}] {strategy}: {STRATEGIES[strategy]}")
        runs[strategy] = StrategyRun(strategy, items, tokenizer, args, device, dtype) if args.no_isolate else \
            _Forked(strategy, items, tokenizer, args, device, dtype)
    for _ in range(args.warmup + args.steps):
        for run in runs.values():
            progress(run.step())
    return {strategy: run.summary() for strategy, run in runs.items()}


# --- report --------------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    head = (f"{'strategy':<21} {'useful tok/s':>12} {'padded tok/s':>12} {'padding':>8} {'peak MB':>8} {'loss':>7} {'× pad_to_max':>12} "
            f"{'GFLOP/s':>8} {'% peak':>6}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        ratio = f"{r['ratio_to_pad_to_max']:.2f}×" if r["ratio_to_pad_to_max"] is not None else "-"
        lines.append(
            f"{name:<21} {r['useful_tokens_per_s']:>12.1f} {r['padded_tokens_per_s']:>12.1f} {r['padding_share']:>8.1%} "
            f"{r['peak_mem_mb']:>8.0f} {r['loss']:>7.3f} {ratio:>12} {r['gflops_per_s']:>8.1f} {r['peak_share']:>6.0%}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="比较各种批处理策略的训练吞吐（同一机器、同一模型、同一数据）/ Compare training throughput of batching "
                    "strategies (pad-to-max as upstream, dynamic padding, length grouping, packing) on one machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", help="多轮对话数据（JSON/JSONL）；默认在临时目录运行数据流水线生成宝可梦对话 / multi-turn data; "
                                       "default: generate the Pokémon conversations with the data pipeline into a temp dir")
    parser.add_argument("--tokenizer", default=str(_common.DEFAULT_TOKENIZER), help="分词器目录 / tokenizer folder")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="逗号分隔 / comma-separated subset of: " + ", ".join(STRATEGIES))
    parser.add_argument("--batch-size", type=int, default=4, help="每步的行数 / rows per step")
    parser.add_argument("--max-seq-length", type=int, default=512, help="截断与补齐长度，也是打包的行长 / truncation, pad-to-max and packing row length")
    parser.add_argument("--pre-seq-len", type=int, default=16, help="P-Tuning v2 前缀长度 / P-Tuning v2 prefix length")
    parser.add_argument("--full", action="store_true", help="全参数微调（不用 P-Tuning）/ full fine-tuning instead of P-Tuning v2")
    parser.add_argument("--lr", type=float, help="AdamW 学习率 / AdamW learning rate (default: 2e-2 P-Tuning, 1e-4 full)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="梯度检查点 / gradient checkpointing")
    parser.add_argument("--warmup", type=int, default=2, help="不计时的预热步数 / untimed warm-up steps")
    parser.add_argument("--steps", type=int, default=6, help="计时步数（取中位数）/ timed steps (median)")
    parser.add_argument("--max-samples", type=int, help="只用前 N 条样本 / use only the first N samples")
    parser.add_argument("--seed", type=int, default=0, help="随机种子 / random seed")
    parser.add_argument("--device", default="auto", help="cpu / cuda / auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *_common.DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU 线程数 / torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-isolate", action="store_true", help="所有策略在同一进程中运行（更快，峰值内存不再独立）/ run all "
                                                                   "strategies in this process (faster; peak memory no longer separate)")
    parser.add_argument("--profile", action="store_true", help="每个策略再跑一步 torch.profiler，打印各类算子的时间占比 / one more "
                                                                "step per strategy under torch.profiler: time share per kind of operator")
    parser.add_argument("--json", action="store_true", help="最后一行输出一个 JSON 对象 / print one JSON object as the last line")
    _docs.add_flag(parser, "bench-train")
    _common.add_shape_args(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_seq_length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} 必须 ≥ 1 / must be at least 1")
    if args.warmup < 0 or args.pre_seq_len < 0:
        parser.error("--warmup / --pre-seq-len 不能为负 / must not be negative")
    if not args.full and args.pre_seq_len == 0:
        parser.error("P-Tuning 需要 --pre-seq-len ≥ 1，或用 --full / P-Tuning needs --pre-seq-len >= 1, or pass --full")
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        parser.error(f"未知策略 / unknown strategy {', '.join(unknown) or '(none given)'}; choose from {', '.join(STRATEGIES)}")
    if args.lr is None:
        args.lr = 1e-4 if args.full else 2e-2
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype, tokenizer = _common.setup(args)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            progress("生成宝可梦对话数据 / generating the Pokémon conversations with the data pipeline ...")
            data = _common.pokemon_conversations(Path(tmp))
        dataset = build_dataset(data, tokenizer, "multi-turn", max_seq_length=args.max_seq_length, verbose=False)
    progress(dataset.summary())
    items = list(dataset.items)
    if args.max_samples:
        items = items[:args.max_samples]
    lengths = [len(item["input_ids"]) for item in items]

    # Stdout is written once the run is over (the matmul peak is measured after the strategies), with the
    # machine's load as it was when the run began.
    started = f"# bench_train.py  {datetime.datetime.now():%Y-%m-%d %H:%M}  {_common.machine_line(device, dtype)}"
    results = run_strategies(args.strategies, items, tokenizer, args, device, dtype)
    progress("测量矩阵乘峰值 / measuring the float32 matmul peak ...")
    peaks = _common.matmul_peak_gflops(device)
    peak = max(peaks.values())
    baseline = results.get(BASELINE)
    for r in results.values():
        r["ratio_to_pad_to_max"] = r["useful_tokens_per_s"] / baseline["useful_tokens_per_s"] if baseline else None
        r["peak_share"] = r["gflops_per_s"] / peak

    method = "full fine-tuning" if args.full else f"P-Tuning v2 (pre_seq_len {args.pre_seq_len})"
    recorder = _docs.Recorder("bench-train", args, "bench_train.py", argv)
    print(started)
    print(f"# model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads x {args.kv_channels}, {args.kv_groups} KV groups, "
          f"ffn {args.ffn}, vocab {args.vocab}; {method}, AdamW lr {args.lr:g}"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    print(f"# data: {data if args.data else 'Pokémon conversations (data pipeline)'}: {len(items)} samples, tokens mean "
          f"{statistics.fmean(lengths):.0f}, max {max(lengths)}; batch {args.batch_size}, max_seq_length {args.max_seq_length}; "
          f"{args.warmup} warm-up + {args.steps} timed steps (median)")
    print("# pad_to_max computes the loss the upstream way (float32 logits over the full vocabulary at every position); "
          "the other rows use the model's loss (labelled positions only)")
    print(f"# float32 matmul peak measured after the steps (2048^3, best): {', '.join(f'{k} {v:.0f}' for k, v in peaks.items())} "
          f"GFLOP/s; GFLOP/s column = matmul FLOPs the step computes (benchmarks/_common.step_flops) / step time (median); "
          f"% peak = GFLOP/s / {peak:.0f}" + (f"; load average at the end {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""))
    print(table(results))
    for name, r in results.items():
        if "profile" in r:
            kinds = ", ".join(f"{kind} {share:.0%}" for kind, share in r["profile"]["kinds"].items())
            top = ", ".join(f"{op} {share:.0%}" for op, share in r["profile"]["top"])
            print(f"# profile {name}: {kinds}; top operators: {top}")
    if args.json:
        print(json.dumps({name: {key: (round(value, 4) if isinstance(value, float) else value) for key, value in r.items()}
                          for name, r in results.items()}, ensure_ascii=False))
    recorder.publish()


if __name__ == "__main__":
    try:
        main()
    except (ChatGLMError, _docs.DocsError) as e:  # bad data, tokenizer or flags: the message says what to do
        _common.fail(str(e))
    except KeyboardInterrupt:
        _common.fail("已中断 / interrupted", 130)
