#!/usr/bin/env python
"""内存需求实测 / Memory needed, measured at chatglm3-6b's exact shape.

Writes, once, a random model of chatglm3-6b's exact shape in the official layout (bf16 safetensors shards with
model.safetensors.index.json, config.json, the real tokenizer), then runs every row in a fresh process through
the project's own entry points and measures its peak resident memory and its seconds:

  load                 the model with no flags (chatglm3.checkpoint.loading, as inference.py loads it)
  chat_bf16/8bit/4bit  load + a chat reply of --new-tokens greedy tokens: first-token seconds, tokens/s after it
  ptuning_bf16, lora_bf16, qlora_4bit, ptuning_4bit
                       the launchers (finetune_ps_pt_m.sh, finetune_lora.sh) for 2 steps of 512-token samples,
                       batch 1, gradient checkpointing (PRE_SEQ_LEN 128, LORA_RANK 8, QUANTIZATION_BIT 4)
  export_merge         scripts/export.py merging a LoRA adapter (rank 8) into the bf16 model

A row that fails or is refused is recorded with its one-line reason and the run goes on. The Markdown table
(machine, command, date, targets) goes to --out and, with --update-docs (old name: --update-readme), into
docs/performance.md between the memory-table markers. `--device cuda` runs the same rows on a GPU (gpu_bench.sh
does): peak torch.cuda.max_memory_allocated beside the host's peak RSS. Each row prints a line when it starts and
when it ends, and while its child runs, after 10 s, its elapsed time, RSS and the time left by the rows' estimates
(redrawn in place on a terminal; a plain line every 30 s otherwise, e.g. in a log).

    python benchmarks/bench_memory.py --update-docs           # everything (about 30 minutes on 2 CPU cores)
    python benchmarks/bench_memory.py --rows load,chat_4bit   # some rows
    python benchmarks/bench_memory.py --shape tiny            # the same harness on a 2-layer model (seconds)

The parent process imports no torch: a child's peak resident memory (the kernel's high-water mark, os.wait4)
includes whatever its parent held when it was started, so the parent stays small. Linux only (/proc).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import _docs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
SCRIPTS = DEMO / "scripts"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "chatglm3-tokenizer"
MARKER = "memory-table"  # the table's markers in docs/performance.md
RESULT_TAG = "BENCH_MEMORY_RESULT "  # a child's last stdout line: this tag, then its JSON
GB = 1e9

# chatglm3-6b's config.json (THUDM/chatglm3-6b), and a 2-layer model of the same kind for checking the harness.
OFFICIAL = dict(padded_vocab_size=65024, seq_length=8192, multi_query_attention=True, add_qkv_bias=True,
                add_bias_linear=False, rmsnorm=True, post_layer_norm=True, original_rope=True, layernorm_epsilon=1e-5,
                apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, fp32_residual_connection=False,
                apply_residual_connection_post_layernorm=False, bias_dropout_fusion=True, hidden_dropout=0.0,
                attention_dropout=0.0)
SHAPES = {
    "6b": dict(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32, kv_channels=128,
               multi_query_group_num=2),
    "tiny": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, kv_channels=16,
                 multi_query_group_num=2),
}
SHARD_BYTES = 2 * 10**9  # the official checkpoint's ~2 GB shards (7 at this shape)
INIT_STD = 0.02          # small random weights: activations stay finite through 28 layers in bf16
SEQ_LEN, PRE_SEQ_LEN, LORA_RANK, STEPS = 512, 128, 8, 2
PROMPT = "皮卡丘是什么属性的宝可梦？它有哪些招式？"


# --- rows ------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    label: str                      # what the table calls it
    kind: str                       # "model" (a child of this script), "train" (a launcher), "export"
    flags: tuple = ()               # inference flags (model rows)
    launcher: str = ""              # train rows
    env: dict = field(default_factory=dict)
    new_tokens: bool = False        # model rows: chat after loading
    target: Optional[Callable] = None   # (result, context) -> (text, passed)
    estimate_s: int = 60            # seconds at the 6b shape on 2 busy CPU cores (measured), for the time left


def _max_gb(limit):
    return lambda r, ctx: (f"≤ {limit:g} GB", r["peak_gb"] <= limit)


def _chat_target(r, ctx):
    text, ok = _max_gb(14)(r, ctx)
    return f"{text}, ≥ 0.7 tok/s", ok and r.get("tokens_per_s", 0) >= 0.7


def _export_target(r, ctx):
    limit = 1.2 * ctx["weights_bytes"] / GB
    return f"≤ 1.2× weights ({limit:.1f} GB)", r["peak_gb"] <= limit


ROWS = [
    Row("load", "加载 / load", "model", estimate_s=30),
    Row("chat_bf16", "对话 / chat, bf16", "model", new_tokens=True, target=_chat_target, estimate_s=150),
    Row("chat_8bit", "对话 / chat, 8-bit", "model", ("--quantization-bit", "8"), new_tokens=True, estimate_s=600),
    Row("chat_4bit", "对话 / chat, 4-bit", "model", ("--quantization-bit", "4"), new_tokens=True, target=_max_gb(6),
        estimate_s=600),
    Row("ptuning_bf16", "P-Tuning v2, bf16", "train", launcher="finetune_ps_pt_m.sh",
        env={"PRE_SEQ_LEN": str(PRE_SEQ_LEN)}, target=_max_gb(16), estimate_s=300),
    Row("lora_bf16", "LoRA r8, bf16", "train", launcher="finetune_lora.sh", env={"LORA_RANK": str(LORA_RANK)},
        target=_max_gb(16), estimate_s=300),
    Row("qlora_4bit", "QLoRA r8, 4-bit", "train", launcher="finetune_lora.sh",
        env={"LORA_RANK": str(LORA_RANK), "QUANTIZATION_BIT": "4"}, target=_max_gb(8), estimate_s=360),
    Row("ptuning_4bit", "P-Tuning v2, 4-bit", "train", launcher="finetune_ps_pt_m.sh",
        env={"PRE_SEQ_LEN": str(PRE_SEQ_LEN), "QUANTIZATION_BIT": "4"}, estimate_s=360),
    Row("export_merge", "LoRA 合并导出 / LoRA merge export", "export", target=_export_target, estimate_s=180),
]
ROW_NAMES = [r.name for r in ROWS]
# What every training row sets (the launchers' variables): 2 steps of one 512-token sample, recomputation on.
TRAIN_ENV = {"MAX_SEQ_LEN": str(SEQ_LEN), "DEV_BATCH_SIZE": "1", "GRAD_ACCUMULATION_STEPS": "1", "MAX_STEP": str(STEPS),
             "SAVE_INTERVAL": "1000", "LOG_INTERVAL": "1", "RESUME": "false", "GRADIENT_CHECKPOINTING": "1"}


class BenchError(Exception):
    """Bad input; main() prints the message (one line) and exits 2."""


def progress(message: str):
    print(message, file=sys.stderr, flush=True)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# --- the children: writing the model, and the model rows --------------------------------------------------------------
def _child_imports():
    import _common  # noqa: F401  (the drop-in folder on sys.path; torch is imported in the child only)


def _model_config(shape: str):
    from chatglm3 import ChatGLMConfig

    return ChatGLMConfig(**OFFICIAL, **SHAPES[shape], torch_dtype="bfloat16", architectures=["ChatGLMForConditionalGeneration"])


def _plan_shards(specs: list, limit: int) -> list:
    """Consecutive tensors grouped into shards of at most `limit` bytes (a tensor larger than that alone)."""
    shards, current, size = [], [], 0
    for name, shape, nbytes in specs:
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + ([current] if current else [])


def _random_tensor(name: str, shape, rotary, seed: int, index: int):
    """One tensor of the random model, in bf16: norms 1, rotary frequencies as the model computes them, every other
    weight N(0, INIT_STD) from its own generator (the same model whatever the shard layout), filled in row
    blocks so that no float32 copy of a whole large tensor is ever held."""
    import torch

    if name.endswith("inv_freq"):
        return rotary.frequencies("cpu").to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    if name.endswith("layernorm.weight"):
        return out.fill_(1.0)
    generator = torch.Generator().manual_seed(seed * 100003 + index)
    flat = out.view(-1, shape[-1]) if len(shape) > 1 else out.view(1, -1)
    for block in flat.split(max(1, 2**24 // flat.shape[1])):
        block.copy_(torch.randn(block.shape, generator=generator) * INIT_STD)
    return out


def _written_model(model_dir: Path, shape: str, seed: int) -> Optional[dict]:
    """The manifest of a complete model of this shape and seed in `model_dir` (bench_memory.json, written last,
    lists every file with its size), else None."""
    try:
        saved = json.loads((model_dir / "bench_memory.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (saved.get("shape"), saved.get("seed"), saved.get("init_std")) != (shape, seed, INIT_STD):
        return None
    files = saved.get("files") or {}
    if files and all((model_dir / f).is_file() and (model_dir / f).stat().st_size == size for f, size in files.items()):
        return saved
    return None


def write_model(model_dir: Path, shape: str, tokenizer_dir: Path, seed: int) -> dict:
    """The random model in the official layout, written shard by shard (peak memory about one shard); skipped
    when a complete one of the same shape and seed is already there."""
    import torch
    from safetensors.torch import save_file

    from chatglm3 import ChatGLMForConditionalGeneration
    from chatglm3.output_files import share_weight_files

    saved = _written_model(model_dir, shape, seed)
    if saved is not None:
        progress(f"模型已存在 / model already written: {model_dir}")
        return {"weights_bytes": saved["weights_bytes"], "shards": saved["shards"], "written": False}
    ours = (model_dir / "bench_memory.json").exists() or (model_dir / ".bench_memory_partial").exists()
    if model_dir.is_dir() and any(model_dir.iterdir()) and not ours:
        raise BenchError(f"错误：{model_dir} 非空且不是本脚本写的模型，不会覆盖；请换 --model-dir / Error: {model_dir} is not "
                         "empty and holds no model of this script: it is left alone; choose another --model-dir")
    tokenizer_files = sorted(p.name for p in tokenizer_dir.iterdir() if p.is_file() and p.name.startswith("tokenizer"))
    config = _model_config(shape)
    with torch.device("meta"):
        meta = ChatGLMForConditionalGeneration(config)
    specs = [(n, tuple(t.shape), t.numel() * 2) for n, t in meta.state_dict().items()]
    shards = _plan_shards(specs, SHARD_BYTES)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / ".bench_memory_partial").touch()
    (model_dir / "bench_memory.json").unlink(missing_ok=True)
    for old in model_dir.glob("model-*.safetensors"):  # an earlier model of another shape
        old.unlink()
    total = sum(nbytes for _, _, nbytes in specs)
    rotary = meta.transformer.rotary_pos_emb
    weight_map, started, done, index = {}, time.perf_counter(), 0, 0
    for number, (shard, name) in enumerate(zip(shards, names), 1):
        tensors = {}
        for key, shape_ in shard:
            tensors[key] = _random_tensor(key, shape_, rotary, seed, index)
            index += 1
            weight_map[key] = name
        save_file(tensors, str(model_dir / name), metadata={"format": "pt"})
        done += sum(t.numel() * 2 for t in tensors.values())
        del tensors
        elapsed = time.perf_counter() - started
        progress(f"写入模型 / writing the model: shard {number}/{len(shards)}, {done / GB:.1f}/{total / GB:.1f} GB, "
                 f"{elapsed:.0f} s, about {minutes(elapsed * (total - done) / done)} left")
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n", encoding="utf-8")
    config.save_pretrained(model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}) + "\n")
    for file in tokenizer_files:
        shutil.copyfile(tokenizer_dir / file, model_dir / file)
    files = [*names, "config.json", "model.safetensors.index.json", "generation_config.json", *tokenizer_files]
    manifest = {"shape": shape, "seed": seed, "init_std": INIT_STD, "weights_bytes": total, "shards": len(shards),
                "files": {f: (model_dir / f).stat().st_size for f in files}}
    (model_dir / "bench_memory.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    share_weight_files(model_dir)  # safetensors writes 0o600; the project's saves give the usual permissions
    (model_dir / ".bench_memory_partial").unlink()
    return {"weights_bytes": total, "shards": len(shards), "written": True, "write_s": round(time.perf_counter() - started)}


def write_samples(path: Path, tokenizer, count: int = 4) -> list:
    """`count` multi-turn Pokémon conversations of exactly SEQ_LEN tokens each in the chat format (whole turns, the
    last reply padded with digits, one token each in ChatGLM3's vocabulary): every step trains SEQ_LEN tokens."""
    from chatglm3.model.conversation import encode_sample

    turns = [("皮卡丘是什么属性？", "皮卡丘是电属性的宝可梦，擅长十万伏特和电光一闪，速度很快，但防御较低。"),
             ("它的弱点是什么？", "电属性宝可梦害怕地面属性的招式，比如地震和挖洞，地面属性的攻击对它效果绝佳。"),
             ("喷火龙呢？", "喷火龙是火与飞行属性，能使用喷射火焰和空气斩，岩石属性的招式对它有四倍的效果。"),
             ("妙蛙种子适合新手吗？", "妙蛙种子是草与毒属性，前期对付岩石和水属性的道馆很轻松，非常适合新手训练家。")]
    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for n in range(count):
            messages = []
            while True:
                user, reply = turns[(len(messages) // 2 + n) % len(turns)]
                grown = messages + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
                if len(encode_sample(tokenizer, {"conversations": grown})[0]) > SEQ_LEN:
                    break
                messages = grown
            sample = {"conversations": messages}
            while len(encode_sample(tokenizer, sample)[0]) < SEQ_LEN:
                messages[-1]["content"] += str(len(messages[-1]["content"]) % 10)
            if len(encode_sample(tokenizer, sample)[0]) > SEQ_LEN:
                messages[-1]["content"] = messages[-1]["content"][:-1]
            lengths.append(len(encode_sample(tokenizer, sample)[0]))
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return lengths


def write_adapter(folder: Path, model_dir: Path, shape: str, seed: int):
    """A random LoRA adapter (rank 8 on query_key_value, PEFT's format, as finetune_lora.sh saves one) for the
    merge-export row, so that row does not depend on a training row's result."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = _model_config(shape)
    lora = LoraConfig(task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"],
                      base_model_name_or_path=str(model_dir))
    folder.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(folder))
    qkv = config.hidden_size + 2 * config.multi_query_group_num * config.kv_channels
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        key = f"base_model.model.transformer.encoder.layers.{layer}.self_attention.query_key_value"
        tensors[f"{key}.lora_A.weight"] = torch.randn(LORA_RANK, config.hidden_size, generator=generator) * INIT_STD
        tensors[f"{key}.lora_B.weight"] = torch.randn(qkv, LORA_RANK, generator=generator) * INIT_STD
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def child_prepare(args) -> dict:
    """Model (once), training data and the adapter, plus what the report says about the software."""
    import torch

    from chatglm3.checkpoint.loading import load_tokenizer

    info = write_model(args.model_dir, args.shape, args.tokenizer, args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model_dir)
    info["sample_tokens"] = write_samples(args.work_dir / "train.jsonl", tokenizer)
    write_adapter(args.work_dir / "adapter", args.model_dir, args.shape, args.seed)
    info["torch"] = torch.__version__
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def _rss_now_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GB
    return 0.0


def child_model_row(args, row: Row) -> dict:
    """Load through the inference scripts' own flags and loader (cli.load_from_args), then, for a chat row, one
    greedy reply of --new-tokens tokens that never stops early (chatglm3.model.generation.generate_stream, the loop of
    model.chat and inference.py)."""
    import torch
    from chatglm3.cli import add_model_args, load_from_args

    from chatglm3.model.conversation import prompt_ids
    from chatglm3.model.generation import generate_stream

    parser = argparse.ArgumentParser(prog=f"bench_memory.py --row {row.name}", allow_abbrev=False)
    add_model_args(parser)
    device = ["--device", "cuda"] if args.device == "cuda" else []  # CPU: no flags at all, as a user types it
    model_args = parser.parse_args(["--model", str(args.model_dir), *device, *row.flags])
    cuda = args.device == "cuda"

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    start = now()
    model, tokenizer = load_from_args(model_args)
    result = {"load_s": round(now() - start, 1), "rss_after_load_gb": round(_rss_now_gb(), 2),
              "weights_gb": round(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / GB, 2),
              "dtype": str(model.dtype).replace("torch.", ""), "device": str(next(model.parameters()).device)}
    if row.new_tokens:
        ids = torch.tensor([prompt_ids(tokenizer, [], PROMPT)], device=next(model.parameters()).device)
        start, first, count = now(), None, 0
        for token in generate_stream(model, ids, max_new_tokens=args.new_tokens, eos_token_id=[]):
            count += 1
            if first is None:
                first = now()
            elif count >= 3 and now() - first > args.decode_seconds:  # a slow row: enough tokens for a rate
                break
        end = now()
        result.update(prompt_tokens=ids.shape[1], new_tokens=count, first_token_s=round(first - start, 4),  # a tiny model's first token takes ms
                      tokens_per_s=round((count - 1) / (end - first), 3) if count > 1 else None)
    if cuda:
        result["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
    return result


# --- the parent: running a row in a fresh process, measuring it ------------------------------------------------------
def _tree_rss_bytes(pid: int) -> tuple:
    """(resident, anonymous resident) bytes of `pid` and its descendants now; (0, 0) where /proc cannot tell.
    Resident memory also counts the file pages a process has mapped (the safetensors shard being read), which the
    kernel can drop when memory runs short; anonymous memory is what the process itself holds."""
    total = anon = 0
    stack, seen = [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            anon += sum(int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total, anon


class Heartbeat:
    """The line that shows a long row is alive: nothing for its first `first` seconds, then its status, redrawn in
    place every `tty_every` seconds on a terminal, or as a new line every `log_every` seconds otherwise (a log
    gets a few plain lines, no redraws)."""

    def __init__(self, stream=None, first: float = 10, tty_every: float = 2, log_every: float = 30):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.first, self.every = first, (tty_every if self.tty else log_every)
        self.next_at, self.drawn = first, False

    def beat(self, elapsed: float, text: str):
        if elapsed < self.next_at:
            return
        self.next_at = elapsed + self.every
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self.drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self):
        if self.drawn:  # clear the redrawn line, so the row's result line starts clean
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False


def run_measured(command: list, env: dict, log: Path, status: Optional[Callable[[float], str]] = None,
                 heartbeat: Optional[Heartbeat] = None) -> dict:
    """Runs `command` in a fresh process group, output to `log`; returns exit status, seconds and peak memory:
    the larger of the kernel's high-water mark of the largest process in the tree (os.wait4, exact) and the
    summed resident memory of the tree sampled every 0.2 s (a launcher and its training process together);
    beside it the sampled peak of anonymous memory (without the mapped file pages: where the memory goes).
    `status(elapsed)` names the row and the time left for the heartbeat line."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    started = time.perf_counter()
    tree_peak = anon_peak = 0
    heartbeat = heartbeat or Heartbeat()
    try:
        while True:
            pid, status_code, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            rss, anon = _tree_rss_bytes(process.pid)
            tree_peak, anon_peak = max(tree_peak, rss), max(anon_peak, anon)
            elapsed = time.perf_counter() - started
            heartbeat.beat(elapsed, f"    {status(elapsed) + ', ' if status else ''}{elapsed:.0f} s, RSS {rss / GB:.1f} GB "
                                    f"(peak {tree_peak / GB:.1f} GB, anonymous {anon_peak / GB:.1f} GB)")
            time.sleep(0.2)
    except BaseException:
        os.killpg(process.pid, 9)  # the row's whole process group, never anything else
        process.wait()
        raise
    finally:
        heartbeat.done()
    process.returncode = os.waitstatus_to_exitcode(status_code)
    seconds = time.perf_counter() - started
    return {"returncode": process.returncode, "seconds": round(seconds, 1),
            "peak_gb": round(max(usage.ru_maxrss * 1024, tree_peak) / GB, 2), "anon_peak_gb": round(anon_peak / GB, 2)}


def failure_reason(text: str, returncode: int) -> str:
    """The one line that says why a row failed: its last message, not the launcher's 'training failed' summary."""
    if returncode < 0:
        signal_name = {9: "SIGKILL: 内存不足？/ out of memory?"}.get(-returncode, f"signal {-returncode}")
        return f"被终止 / killed ({signal_name})"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(RESULT_TAG)]
    for line in reversed(lines):
        if not line.startswith(("训练失败", "输出目录")) and not line.startswith("Traceback"):
            return line[:300]
    return f"exit status {returncode}"


def _child_command(args, *extra) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--shape", args.shape, "--model-dir", str(args.model_dir),
            "--tokenizer", str(args.tokenizer), "--work-dir", str(args.work_dir), "--device", args.device,
            "--new-tokens", str(args.new_tokens), "--decode-seconds", str(args.decode_seconds), "--seed", str(args.seed), *extra]


def _child_result(log: Path) -> Optional[dict]:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def _train_details(text: str) -> dict:
    """Loss per step and the Trainer's own seconds (its log lines are Python dicts, values quoted or not)."""
    number = r"'?([-+0-9.eE]+|nan)'?"
    losses = [float(x) for x in re.findall(r"'loss': " + number, text)]
    runtime = re.findall(r"'train_runtime': " + number, text)
    details = {"losses": losses}
    if runtime:
        details["train_s"] = float(runtime[-1])
    gpu = {k: float(v) for k, v in re.findall(r"'(before_init_mem_gpu|init_mem_gpu_alloc_delta|train_mem_gpu_alloc_delta|"
                                               r"train_mem_gpu_peaked_delta)': " + number, text)}
    if len(gpu) == 4:  # the Trainer's memory metrics (CUDA): its peak during training, counted from zero
        details["cuda_peak_gb"] = round(sum(gpu.values()) / GB, 2)
    return details


def row_command(row: Row, args) -> tuple:
    """(command, environment, what the table shows as the command) of a row."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the launchers call `python`
    env["PYTHONUNBUFFERED"] = "1"
    if row.kind == "model":
        shown = "inference.py --model M" + "".join(f" {f}" for f in row.flags)
        return _child_command(args, "--row", row.name), env, shown
    if row.kind == "export":
        out = args.work_dir / "export_merge"
        command = [sys.executable, str(SCRIPTS / "export.py"), "--model", str(args.model_dir), "--adapter",
                   str(args.work_dir / "adapter"), "--output", str(out), "--force"]
        return command, env, "scripts/export.py --model M --adapter A --output OUT"
    settings = {**TRAIN_ENV, **row.env, "BASE_MODEL_PATH": str(args.model_dir), "DATASET_PATH": str(args.work_dir / "train.jsonl"),
                "OUTPUT_DIR": str(args.work_dir / row.name), "RUN_NAME": f"bench_{row.name}"}
    if args.device == "cuda":  # the Trainer's own memory metrics carry the GPU peak out of the training process
        settings["EXTRA_ARGS"] = "--skip_memory_metrics False"
    env.update(settings)
    shown = " ".join(f"{k}={v}" for k, v in row.env.items()) + f" bash scripts/{row.launcher}"
    return ["bash", str(SCRIPTS / row.launcher)], env, shown


def precheck(row: Row) -> Optional[str]:
    """A reason not to start a row whose flag the entry point does not have yet: a launcher ignores an unknown
    environment variable silently, so without this check the row would measure something else."""
    if row.kind == "train":
        text = (SCRIPTS / row.launcher).read_text(encoding="utf-8")
        missing = [k for k in row.env if not re.search(rf"\b{k}\b", text)]
        if missing:
            return f"scripts/{row.launcher} 不读取 {', '.join(missing)} / does not read {', '.join(missing)}"
    return None


def run_row(row: Row, args, status: Optional[Callable[[float], str]] = None) -> dict:
    reason = precheck(row)
    if reason:
        return {"ok": False, "reason": reason}
    command, env, shown = row_command(row, args)
    log = args.work_dir / f"{row.name}.log"
    for leftover in (args.work_dir / row.name, args.work_dir / "export_merge"):
        shutil.rmtree(leftover, ignore_errors=True)
    measured = run_measured(command, env, log, status)
    text = log.read_text(encoding="utf-8", errors="replace")
    result = {**measured, "command": shown, "log": str(log)}
    if measured["returncode"] != 0:
        return {**result, "ok": False, "reason": failure_reason(text, measured["returncode"])}
    if row.kind == "model":
        child = _child_result(log)
        if child is None:
            return {**result, "ok": False, "reason": "子进程没有报告结果 / the child reported no result"}
        result.update(child)
    elif row.kind == "export":
        result["output_gb"] = round(sum(f.stat().st_size for f in (args.work_dir / "export_merge").iterdir()) / GB, 2)
    elif row.kind == "train":
        result.update(_train_details(text))
        if len(result["losses"]) < STEPS:
            return {**result, "ok": False, "reason": f"日志中只有 {len(result['losses'])} 步 / the log shows "
                                                       f"{len(result['losses'])} of {STEPS} steps"}
    shutil.rmtree(args.work_dir / row.name, ignore_errors=True)
    shutil.rmtree(args.work_dir / "export_merge", ignore_errors=True)  # 12.5 GB at the real shape
    return {**result, "ok": True}


# --- the report ------------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu, memory = platform.processor() or platform.machine(), 0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(memory / GB, 1),
            "load": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}


def gb(value: float) -> str:
    return f"{value:.1f} GB" if value >= 1 else f"{value:.2f} GB"


def details_text(row: Row, r: dict) -> str:
    if not r.get("ok"):
        return f"**未完成 / did not finish**: {r['reason']}"
    parts = []
    if row.kind == "model":
        parts.append(f"加载 / load {r['load_s']:.0f} s; {r['dtype']} on {r['device']}, {gb(r['weights_gb'])} of weights in memory, "
                     f"RSS {gb(r['rss_after_load_gb'])} after loading")
        if row.new_tokens:
            speed = f"{r['tokens_per_s']:.2f}" if r.get("tokens_per_s") is not None else "-"
            first_token = r["first_token_s"]
            first_token = f"{first_token:.1f} s" if first_token >= 0.1 else f"{first_token * 1000:.0f} ms"
            parts.append(f"首 token / first token {first_token}, then {speed} tok/s ({r['new_tokens']} tokens)")
    elif row.kind == "train":
        if "train_s" in r:
            parts.append(f"{r['train_s'] / STEPS:.0f} s/step")
        parts.append("loss " + " → ".join(f"{x:.2f}" for x in r["losses"]))
    elif row.kind == "export":
        parts.append(f"{gb(r['output_gb'])} written (bf16, merged)")
    if "cuda_peak_gb" in r:
        parts.append(f"GPU peak {r['cuda_peak_gb']:.1f} GB")
    if r.get("anon_peak_gb"):
        parts.append(f"匿名内存峰值 / anonymous peak {gb(r['anon_peak_gb'])} (the rest: mapped file pages)")
    return "; ".join(parts)


def judge(row: Row, r: dict, ctx: dict) -> str:
    if not r.get("ok"):
        return "未完成 / **miss** (did not run to the end)"
    if row.target is None or ctx["shape"] != "6b":
        return "完成 / ran to the end"
    text, passed = row.target(r, ctx)
    return f"{text}: {'达到 / pass' if passed else '**未达到 / miss**'}"


def speed_note(results: dict) -> str:
    """The sentence under the table on chat speed, from this run's figures: the rows ranked, fastest first."""
    labels = {"chat_bf16": ("bf16", "bf16"), "chat_8bit": ("8 比特", "8-bit"), "chat_4bit": ("4 比特", "4-bit")}
    speeds = {n: results[n].get("tokens_per_s") for n in labels
              if results.get(n, {}).get("ok") and results[n].get("tokens_per_s")}
    if len(speeds) < 2:
        return ""
    ranked = sorted(speeds, key=speeds.get, reverse=True)
    zh = " > ".join(f"{labels[n][0]} {speeds[n]:.2f}" for n in ranked)
    en = " > ".join(f"{labels[n][1]} {speeds[n]:.2f}" for n in ranked)
    return (f"CPU 上首 token 之后的解码速度（token/s）/ decoding speed on the CPU after the first token (tokens/s): "
            f"{zh} / {en}.")


def report(results: dict, ctx: dict, args, total_s: float) -> str:
    m = ctx["machine"]
    device = "CUDA" if args.device == "cuda" else "CPU"
    lines = [
        f"**内存需求 / memory needed** — {device}, 实测 / measured, chatglm3-6b 的形状 / shape" if args.shape == "6b"
        else f"**内存需求 / memory needed** — {device}, {args.shape} shape (harness check: figures say nothing about 6B)",
        "",
        f"- 机器 / machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; torch {ctx.get('torch')}, bitsandbytes "
        f"{ctx.get('bitsandbytes')}; {ctx['date']}; load average {m['load']} at the start"
        + (f"; GPU {ctx['gpu']}" if ctx.get("gpu") else ""),
        f"- 命令 / command: `{ctx['command']}` (every row in a fresh process; {minutes(total_s)} in all"
        + (", ≤ 30 min: pass" if args.shape == "6b" and total_s <= 1800 and len(results) == len(ROWS) else "") + ")",
        f"- 模型 / model: random bf16 weights, {ctx['weights_bytes'] / GB:.2f} GB in {ctx['shards']} safetensors shards, "
        f"the real tokenizer; chat: {args.new_tokens} greedy tokens (fewer where decoding passed {args.decode_seconds:g} s) after a "
        f"{ctx.get('prompt_tokens') or '~20'}-token prompt; "
        f"training: {STEPS} steps of {SEQ_LEN}-token samples, batch 1, gradient checkpointing "
        f"({' '.join(f'{k}={v}' for k, v in TRAIN_ENV.items() if k in ('MAX_SEQ_LEN', 'DEV_BATCH_SIZE', 'MAX_STEP', 'GRADIENT_CHECKPOINTING'))})",
        "- 峰值内存 / peak memory: resident memory (RSS, GB = 10⁹ bytes) of the row's processes"
        + ("; GPU peak: torch.cuda.max_memory_allocated" if args.device == "cuda" else ""),
        "",
        "| 项目 / row | 命令 / command | 峰值内存 / peak RSS | 时间 / time | 细节 / details | 目标 / target |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for row in ROWS:
        if row.name not in results:
            continue
        r = results[row.name]
        peak = gb(r["peak_gb"]) if r.get("peak_gb") is not None else "-"
        seconds = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "-"
        lines.append(f"| {row.label} | `{r.get('command') or row_command(row, args)[2]}` | {peak} | {seconds} | "
                     f"{details_text(row, r)} | {judge(row, r, ctx)} |")
    note = speed_note(results) if args.device == "cpu" else ""
    return "\n".join(lines + ([""] + note.splitlines() if note else [])) + "\n"


def update_docs(table: str, path: Optional[Path] = None):
    """The table into docs/performance.md, between the memory-table markers."""
    try:
        _docs.update_docs(path or _docs.PERFORMANCE, MARKER, table)
    except _docs.DocsError as e:
        raise BenchError(str(e)) from None


# --- command line ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="python benchmarks/bench_memory.py --update-docs : 全部测量并更新 docs/performance.md / "
                                            "measure everything and update docs/performance.md")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="6b",
                        help="6b: chatglm3-6b 的形状（默认）/ chatglm3-6b's shape (default); tiny: 2 层，检查脚本 / 2 layers, to check the harness")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="随机模型的目录（只写一次）/ where the random model is written once "
                             "(default: ../big/chatglm3-SHAPE-shape beside the repository)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="真实 ChatGLM3 分词器目录 / the real ChatGLM3 tokenizer folder (default: ../shared/chatglm3-tokenizer)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="训练输出、数据与日志 / training outputs, data and logs (default: MODEL_DIR.work; not /tmp, "
                             "which may live in RAM)")
    parser.add_argument("--rows", default=",".join(ROW_NAMES), help=f"要测的行，逗号分隔 / rows to run (default: all): {','.join(ROW_NAMES)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu（默认）或 cuda / cpu (default) or cuda")
    parser.add_argument("--new-tokens", type=int, default=16, help="对话生成的 token 数 / tokens per chat reply (default 16)")
    parser.add_argument("--decode-seconds", type=float, default=90,
                        help="对话在首 token 之后最多解码这么多秒（至少 3 个 token）/ a chat row stops decoding after this many "
                             "seconds past the first token, once it has 3 tokens (default 90: the 8-bit row on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="随机权重的种子 / seed of the random weights (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="表格文件 / table file (default: benchmarks/results/memory_cpu.md, memory_cuda.md with --device cuda)")
    parser.add_argument("--update-docs", "--update-readme", dest="update_docs", action="store_true",
                        help="把表格写进 docs/performance.md 的 memory-table 标记之间 / put the table into docs/performance.md "
                             "between the memory-table markers (--update-readme: the old name)")
    parser.add_argument("--json", action="store_true", help="最后一行输出 JSON / print every figure as a JSON last line")
    parser.add_argument("--row", choices=ROW_NAMES, default=None, help=argparse.SUPPRESS)  # a child: one model row
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # a child: model, data, adapter
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        raise BenchError(f"错误：--new-tokens 至少为 2（收到 {args.new_tokens}）/ Error: --new-tokens must be at least 2 "
                         f"(got {args.new_tokens}): tokens/s is measured after the first token")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROW_NAMES]
    if unknown or not args.rows:
        raise BenchError(f"错误：--rows 中未知的行 {','.join(unknown) or '（空）'}；可选 / Error: unknown rows in --rows "
                         f"{','.join(unknown) or '(empty)'}; choose from {','.join(ROW_NAMES)}")
    args.model_dir = (args.model_dir or REPO.parent / "big" / f"chatglm3-{args.shape}-shape").resolve()
    args.work_dir = (args.work_dir or args.model_dir.with_name(args.model_dir.name + ".work")).resolve()
    args.tokenizer = args.tokenizer.resolve()
    args.out = args.out or REPO / "benchmarks" / "results" / f"memory_{args.device}.md"
    if args.device == "cuda" and not Path("/proc/driver/nvidia").exists() and args.row is None and not args.prepare:
        progress("警告：看不到 NVIDIA 驱动 / Warning: no NVIDIA driver visible; the CUDA rows will say why they fail")
    return args


def run_all(args) -> dict:
    if not hasattr(os, "wait4") or not Path("/proc/self/status").exists():
        raise BenchError("错误：bench_memory.py 需要 Linux（/proc 与 wait4）/ Error: bench_memory.py needs Linux (/proc and wait4)")
    if not (args.tokenizer / "tokenizer.model").is_file():
        raise BenchError(f"错误：{args.tokenizer} 中没有 tokenizer.model（用 --tokenizer 指定）/ Error: no tokenizer.model in "
                         f"{args.tokenizer} (pass --tokenizer DIR)")
    for source, flag in ((args.model_dir, "--model-dir"), (args.work_dir, "--work-dir")):
        if source == REPO or REPO in source.parents:
            raise BenchError(f"错误：{flag} {source} 在仓库里；模型与训练输出要放在仓库外 / Error: {flag} {source} is inside the "
                             "repository; put the model and the training outputs outside it")
    if args.work_dir == args.model_dir or args.model_dir in args.work_dir.parents:
        raise BenchError("错误：--work-dir 不能在 --model-dir 里 / Error: --work-dir must not be inside --model-dir")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = [r for r in ROWS if r.name in args.rows]
    scale = 1 if args.shape == "6b" else 0.05
    estimate = sum(r.estimate_s for r in rows) * scale
    progress(f"bench_memory: {len(rows)} rows at the {args.shape} shape on {args.device}, about {minutes(estimate)} "
             f"(plus writing the model once: ~{minutes(600 * scale)}); model {args.model_dir}, work {args.work_dir}")
    prep_log = args.work_dir / "prepare.log"
    prepared = run_measured(_child_command(args, "--prepare"), dict(os.environ), prep_log,
                            lambda elapsed: "准备 / preparing (writing the model once, the data, the adapter)")
    info = _child_result(prep_log)
    if prepared["returncode"] != 0 or info is None:
        raise BenchError(failure_reason(prep_log.read_text(encoding="utf-8", errors="replace"), prepared["returncode"]))
    written = (f"written in {info['write_s']} s" if info["written"] else
               f"模型已存在 / model already written, kept: {args.model_dir}")
    progress(f"准备完毕 / prepared in {prepared['seconds']:.0f} s (peak {gb(prepared['peak_gb'])}): {info['weights_bytes'] / GB:.2f} GB "
             f"in {info['shards']} shards, {written}; training samples of {info['sample_tokens']} tokens")
    rows_started = time.perf_counter()
    results = {}
    for number, row in enumerate(rows, 1):
        after = sum(r.estimate_s for r in rows[number:]) * scale  # the rows after this one, by their estimates
        progress(f"[{number}/{len(rows)}] {row.name}: {row.label} (about {minutes(row.estimate_s * scale + after)} left) ...")

        def status(elapsed, number=number, row=row, after=after):
            left = max(row.estimate_s * scale - elapsed, 0) + after
            return f"[{number}/{len(rows)}] {row.name}: about {minutes(left)} left"
        results[row.name] = run_row(row, args, status)
        r = results[row.name]
        outcome = f"{r['peak_gb']:.2f} GB, {r['seconds']:.0f} s" if r.get("ok") else f"FAILED: {r['reason']}"
        progress(f"[{number}/{len(rows)}] {row.name}: {outcome}")
    total = time.perf_counter() - rows_started
    ctx = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "shape": args.shape, "command": command_line(args), **info,
           "prompt_tokens": next((r["prompt_tokens"] for r in results.values() if r.get("prompt_tokens")), None)}
    if args.device == "cuda":
        ctx["gpu"] = gpu_name()
    table = report(results, ctx, args, total)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    if args.update_docs:
        update_docs(table)
    print(table)
    progress(f"表格 / table: {args.out}" + (" and docs/performance.md" if args.update_docs else "")
             + f"; {minutes(time.perf_counter() - started)} in all")
    return {"rows": results, "context": {k: v for k, v in ctx.items() if k != "machine"}, "machine": ctx["machine"], "total_s": round(total)}


def gpu_name() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(args) -> str:
    """The command that reproduces this table, relative to the repository."""
    parts = ["python", "benchmarks/bench_memory.py"]
    if args.shape != "6b":
        parts += ["--shape", args.shape]
    if args.device != "cpu":
        parts += ["--device", args.device]
    if args.rows != ROW_NAMES:
        parts += ["--rows", ",".join(args.rows)]
    if args.new_tokens != 16:
        parts += ["--new-tokens", str(args.new_tokens)]
    if args.decode_seconds != 90:
        parts += ["--decode-seconds", f"{args.decode_seconds:g}"]
    if args.update_docs:
        parts.append("--update-docs")
    return shlex.join(parts)


def run_child(args) -> int:
    """--prepare or --row NAME: the work of one fresh process; its result is the last stdout line."""
    _child_imports()
    from chatglm3 import ChatGLMError

    try:
        result = child_prepare(args) if args.prepare else child_model_row(args, next(r for r in ROWS if r.name == args.row))
    except (ChatGLMError, BenchError) as e:  # a refusal: its one line is the row's reason
        progress(str(e))
        return 2
    print(RESULT_TAG + json.dumps(result, ensure_ascii=False), flush=True)
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.prepare or args.row:
            return run_child(args)
        summary = run_all(args)
        if args.json:
            print(json.dumps(summary, ensure_ascii=False))
        return 0
    except BenchError as e:
        progress(str(e))
        return 2
    except KeyboardInterrupt:
        progress("已中断 / interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
