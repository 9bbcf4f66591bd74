"""GGUF on a laptop CPU: llama.cpp's generation speed (llama-cpp-python) at f16, q8_0 and q4_k_m beside our own
(chatglm3.model.generation), and each file's size, for a model folder (a tiny model, or chatglm3-6b's shape with random
weights: speed and size only). Greedy decoding that never stops early, the same chat prompt for all.

    python benchmarks/bench_gguf.py --model DIR                       # f16, q8_0, q4_k_m; ours in float32
    python benchmarks/bench_gguf.py --model ../big/chatglm3-6b-shape --ours-dtype bfloat16 --work ../big/gguf6b --update-docs

The .gguf files are written under --work (default: a temporary folder) by scripts/export.py's code path and kept
there with --work; --reuse takes files already there. One engine runs at a time, so the peak memory is one copy of
the model (plus the loaded checkpoint while a file is written). --update-docs puts the printed table into
docs/performance.md between the bench-gguf markers (the chatglm3-6b-shape block).
"""
import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: E402  (puts finetune_chatmodel_demo/ on sys.path)
import _docs  # noqa: E402
from _common import ChatGLMError, fail, progress  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from chatglm3.checkpoint import gguf  # noqa: E402
from chatglm3.model.conversation import prompt_ids  # noqa: E402
from chatglm3.checkpoint.export import export  # noqa: E402
from chatglm3.model.generation import generate_stream  # noqa: E402
from chatglm3.checkpoint.loading import load_model_and_tokenizer, load_tokenizer  # noqa: E402

HISTORY = [
    {"role": "system", "content": "你是一位宝可梦训练家的助手，回答要简洁准确。"},
    {"role": "user", "content": "请告诉我妙蛙种子的属性。"},
    {"role": "assistant", "content": "妙蛙种子的属性是草、毒。"},
    {"role": "user", "content": "它怕什么属性的招式？"},
    {"role": "assistant", "content": "妙蛙种子怕火、冰、飞行、超能力属性的招式。"},
]
QUERY = "它有什么特性？"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="模型目录 / model folder (ChatGLM3 layout)")
    p.add_argument("--types", default="f16,q8_0,q4_k_m", help="GGUF 类型 / GGUF types (default: f16,q8_0,q4_k_m)")
    p.add_argument("--new-tokens", type=int, default=32, help="新生成的词数 / new tokens (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="重复次数，取中位数 / runs, median taken (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU 线程数（两种引擎相同）/ CPU threads, both engines (default: 2)")
    p.add_argument("--ours-dtype", default="float32", choices=["float32", "bfloat16", "float16", "none"],
                   help="我们自己的生成用的精度；none 跳过 / dtype of our own generation; none skips it (default: float32)")
    p.add_argument("--work", default=None, help="写 .gguf 的目录（保留）/ folder for the .gguf files (kept)")
    p.add_argument("--reuse", action="store_true", help="--work 中已有的 .gguf 直接使用 / use the .gguf files already in --work")
    p.add_argument("--json", action="store_true", help="最后一行输出 JSON / print the results as JSON last")
    _docs.add_flag(p, "bench-gguf")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        fail("错误：--new-tokens >= 2、--repeats >= 1、--threads >= 1 / Error: --new-tokens must be >= 2, --repeats and --threads >= 1")
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in gguf.GGUF_TYPES]
    if unknown or not types:
        fail(f"错误：--types 里的 {', '.join(unknown) or '（空）'} 不是 GGUF 类型（可选 {', '.join(gguf.GGUF_TYPES)}）/ "
             f"Error: --types {args.types!r}: not GGUF types (one of {', '.join(gguf.GGUF_TYPES)})")
    args.types = [gguf.parse_type(t) for t in types]
    return args


def gguf_file(model: Path, work: Path, gguf_type: str, reuse: bool):
    """(path, seconds to write it or None when reused)."""
    out = work / f"{model.name}-gguf-{gguf_type}"
    path = out / gguf.file_name(out, gguf_type)
    if reuse and path.is_file():
        return path, None
    start = time.perf_counter()
    export(model, out, "gguf", gguf_type=gguf_type, force=True)
    return path, time.perf_counter() - start


def time_llama_cpp(path: Path, ids: list, new_tokens: int, threads: int):
    """A run() giving (prompt seconds, seconds for the other new_tokens - 1 tokens, tokens)."""
    from llama_cpp import Llama, llama_get_logits_ith

    llm = Llama(model_path=str(path), n_ctx=len(ids) + new_tokens + 8, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    n_vocab = llm.n_vocab()

    def argmax():  # the last position's logits (Llama.scores holds them only with logits_all=True)
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    def run():
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        tokens = [argmax()]
        first = time.perf_counter()
        while len(tokens) < new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(argmax())
        return first - start, time.perf_counter() - first, tokens
    return run


@torch.no_grad()
def time_ours(model, ids: list, new_tokens: int):
    def run():
        start, first, tokens = time.perf_counter(), None, []
        for token in generate_stream(model, torch.tensor([ids]), max_new_tokens=new_tokens, eos_token_id=[]):
            tokens.append(int(token[0]))
            first = first or time.perf_counter()
        return first - start, time.perf_counter() - first, tokens
    return run


def measure(run, repeats: int, ids: list, new_tokens: int) -> dict:
    run()  # warm-up
    prompt, decode, tokens = [], [], None
    for _ in range(repeats):
        p, d, tokens = run()
        prompt.append(p)
        decode.append(d)
    return {"prompt_tokens": len(ids), "prompt_tokens_per_s": len(ids) / statistics.median(prompt),
            "decode_tokens_per_s": (new_tokens - 1) / statistics.median(decode), "tokens": tokens}


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(model_dir)
    ids = prompt_ids(tokenizer, HISTORY, QUERY)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-gguf-") if args.work is None else None
    work = Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)

    results = {}
    for gguf_type in args.types:
        progress(f"{gguf_type}: writing the .gguf ...")
        path, seconds = gguf_file(model_dir, work, gguf_type, args.reuse)
        progress(f"{gguf_type}: llama.cpp, {len(ids)}-token prompt, {args.new_tokens} new tokens ...")
        r = measure(time_llama_cpp(path, ids, args.new_tokens, args.threads), args.repeats, ids, args.new_tokens)
        r.update(engine="llama.cpp", type=gguf_type, file_mb=path.stat().st_size / 2**20, export_s=seconds)
        results[f"llama.cpp {gguf_type}"] = r
        gc.collect()  # the Llama object (and its mapped file) goes before the next one loads
    if args.ours_dtype != "none":
        progress(f"ours ({args.ours_dtype}) ...")
        model, _ = load_model_and_tokenizer(model_dir, device="cpu", dtype=args.ours_dtype)
        r = measure(time_ours(model, ids, args.new_tokens), args.repeats, ids, args.new_tokens)
        r.update(engine="ours", type=args.ours_dtype, file_mb=None, export_s=None)
        results[f"ours {args.ours_dtype}"] = r
        del model

    shape = (f"{config['num_layers']} layers, hidden {config['hidden_size']}, {config['num_attention_heads']} heads x "
             f"{config['kv_channels']}, {config.get('multi_query_group_num')} KV groups, ffn {config['ffn_hidden_size']}, "
             f"vocab {config['padded_vocab_size']}")
    recorder = _docs.Recorder("bench-gguf", args, "bench_gguf.py", argv)
    print(f"# bench_gguf.py  {datetime.datetime.now():%Y-%m-%d %H:%M}  {_common.machine_line('cpu', args.ours_dtype)}")
    print(f"# model: {model_dir.name} ({shape}); {args.threads} threads both engines; greedy, {len(ids)}-token prompt, "
          f"{args.new_tokens} new tokens, median of {args.repeats} runs after a warm-up")
    ours = results.get(f"ours {args.ours_dtype}")
    head = f"{'engine':<10} {'type':<9} {'file MB':>9} {'write s':>8} {'prompt tok/s':>12} {'decode tok/s':>12} {'same 1st token':>14}"
    print(head)
    print("-" * len(head))
    for r in results.values():
        same = "-" if ours is None or r is ours else ("yes" if r["tokens"][0] == ours["tokens"][0] else "no")
        size = f"{r['file_mb']:.1f}" if r["file_mb"] is not None else "-"
        write = f"{r['export_s']:.1f}" if r["export_s"] is not None else "-"
        print(f"{r['engine']:<10} {r['type']:<9} {size:>9} {write:>8} {r['prompt_tokens_per_s']:>12.1f} "
              f"{r['decode_tokens_per_s']:>12.1f} {same:>14}")
    if args.json:
        print(json.dumps({k: {f: v for f, v in r.items() if f != "tokens"} for k, r in results.items()}))
    recorder.publish()
    if work_ctx is not None:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ChatGLMError, _docs.DocsError) as e:
        fail(str(e))
