"""Generation speed: time to first token and decode tokens/s, with and without the KV cache, batch 1 and 8.

With the cache: the model's own loop (chatglm3.model.generation.generate_stream), the path model.generate and
model.chat use. Without: every step re-runs the whole sequence (what a loop without past_key_values costs).
Greedy decoding that never stops early, on a randomly initialised model of the default benchmark shape, so the
token counts are exact; both paths must produce the same tokens (checked and printed).

    python benchmarks/bench_generate.py            # quick: 32 new tokens, batch 1 and 8
    python benchmarks/bench_generate.py --new-tokens 128 --json
"""
import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import _common  # noqa: E402  (puts finetune_chatmodel_demo/ on sys.path)
import _docs  # noqa: E402
from _common import ChatGLMError, progress  # noqa: E402

import torch  # noqa: E402

from chatglm3.serving.batch_replies import left_pad  # noqa: E402
from chatglm3.model.conversation import prompt_ids  # noqa: E402
from chatglm3.model.generation import generate_stream  # noqa: E402

# A short multi-turn chat, so the prompt has the length of a typical follow-up question (about 100 tokens).
SYSTEM = "你是一位宝可梦训练家的助手，回答要简洁准确。"
HISTORY = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "请告诉我妙蛙种子的属性。"},
    {"role": "assistant", "content": "妙蛙种子的属性是草、毒。"},
    {"role": "user", "content": "它怕什么属性的招式？"},
    {"role": "assistant", "content": "妙蛙种子怕火、冰、飞行、超能力属性的招式。"},
]
QUERIES = ["它有什么特性？", "皮卡丘是什么属性？", "小火龙的弱点是什么？", "杰尼龟会进化成什么？",
           "请介绍一下超梦。", "喷火龙怕哪些属性？", "伊布有几种进化形态？", "卡比兽的特性是什么？"]


def prompts(tokenizer, batch_size: int, device: str):
    """Left-padded chat inputs, each row a different question."""
    rows = [prompt_ids(tokenizer, HISTORY, QUERIES[i % len(QUERIES)]) for i in range(batch_size)]
    return left_pad(rows, tokenizer.pad_token_id, device)


@torch.no_grad()
def run_cached(model, ids, mask, new_tokens: int, device: str):
    """(seconds to the first token, seconds for the rest, tokens [b, new])."""
    start = time.perf_counter()
    tokens, first = [], None
    for token in generate_stream(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[]):
        tokens.append(token)
        if first is None:
            _common.synchronize(device)
            first = time.perf_counter()
    _common.synchronize(device)
    return first - start, time.perf_counter() - first, torch.stack(tokens, dim=1)


@torch.no_grad()
def run_uncached(model, ids, mask, new_tokens: int, device: str):
    """Greedy decoding that re-runs the whole sequence at every step."""
    start = time.perf_counter()
    tokens, first = [], None
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=mask, use_cache=False, return_last_logit=True).logits
        token = logits[:, -1].float().argmax(dim=-1)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if first is None:
            _common.synchronize(device)
            first = time.perf_counter()
    _common.synchronize(device)
    return first - start, time.perf_counter() - first, torch.stack(tokens, dim=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="生成速度：首 token 延迟与解码 token/s，有无 KV 缓存，batch 1 与 8 / Generation speed: time to first token "
                    "and decode tokens/s, with and without the KV cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tokenizer", default=str(_common.DEFAULT_TOKENIZER), help="分词器目录 / tokenizer folder")
    parser.add_argument("--batch-sizes", default="1,8", help="逗号分隔 / comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32, help="每行生成的 token 数 / new tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="重复次数（取中位数）/ repeats (median), after one warm-up run")
    parser.add_argument("--pre-seq-len", type=int, default=0, help="P-Tuning v2 前缀长度，0 为无 / P-Tuning prefix length (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="随机种子 / random seed")
    parser.add_argument("--device", default="auto", help="cpu / cuda / auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *_common.DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, help="torch CPU 线程数 / torch CPU threads")
    parser.add_argument("--json", action="store_true", help="最后一行输出一个 JSON 对象 / print one JSON object as the last line")
    _docs.add_flag(parser, "bench-generate")
    _common.add_shape_args(parser)
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes 应为逗号分隔的整数 / must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.new_tokens < 2 or args.repeats < 1 or args.pre_seq_len < 0:
        parser.error("--batch-sizes ≥ 1, --new-tokens ≥ 2, --repeats ≥ 1, --pre-seq-len ≥ 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype, tokenizer = _common.setup(args)
    config = _common.model_config(args, pre_seq_len=args.pre_seq_len, vocab_needed=tokenizer.vocab_size)
    model = _common.build_model(config, device, dtype, args.seed).eval()

    recorder = _docs.Recorder("bench-generate", args, "bench_generate.py", argv)
    print(f"# bench_generate.py  {datetime.datetime.now():%Y-%m-%d %H:%M}  {_common.machine_line(device, dtype)}")
    print(f"# model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads x {args.kv_channels}, {args.kv_groups} KV groups, "
          f"ffn {args.ffn}, vocab {args.vocab}" + (f", P-Tuning prefix {args.pre_seq_len}" if args.pre_seq_len else "")
          + f"; greedy, {args.new_tokens} new tokens per row, median of {args.repeats} runs after a warm-up")

    results = {}
    for batch_size in args.batch_sizes:
        ids, mask = prompts(tokenizer, batch_size, device)
        for name, run in (("kv_cache", run_cached), ("no_cache", run_uncached)):
            progress(f"batch {batch_size}, {name}: prompt {tuple(ids.shape)} ...")
            run(model, ids, mask, args.new_tokens, device)  # warm-up
            ttft, rest, tokens = [], [], None
            for _ in range(args.repeats):
                first, decode, tokens = run(model, ids, mask, args.new_tokens, device)
                ttft.append(first)
                rest.append(decode)
            results[f"batch{batch_size}_{name}"] = {
                "batch_size": batch_size,
                "prompt_tokens": int(mask.sum(dim=1).max()),
                "ttft_ms": statistics.median(ttft) * 1000,
                "decode_tokens_per_s": batch_size * (args.new_tokens - 1) / statistics.median(rest),
                "tokens": tokens,
            }
        cached, uncached = results[f"batch{batch_size}_kv_cache"], results[f"batch{batch_size}_no_cache"]
        same = bool(torch.equal(cached.pop("tokens"), uncached.pop("tokens")))
        cached["same_tokens_as_no_cache"] = uncached["same_tokens_as_no_cache"] = same

    head = f"{'run':<16} {'prompt':>6} {'TTFT ms':>8} {'decode tok/s':>12} {'same tokens':>11}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:<16} {r['prompt_tokens']:>6} {r['ttft_ms']:>8.1f} {r['decode_tokens_per_s']:>12.1f} {'yes' if r['same_tokens_as_no_cache'] else 'NO':>11}")
    for batch_size in args.batch_sizes:
        speedup = results[f"batch{batch_size}_kv_cache"]["decode_tokens_per_s"] / results[f"batch{batch_size}_no_cache"]["decode_tokens_per_s"]
        print(f"# batch {batch_size}: KV cache decodes {speedup:.1f}× as fast as re-running the sequence")
    if args.json:
        print(json.dumps({name: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for name, r in results.items()}))
    if not all(r["same_tokens_as_no_cache"] for r in results.values()):
        _common.fail("错误：有缓存与无缓存生成的 token 不同 / Error: the KV-cache and no-cache runs generated different tokens", 1)
    recorder.publish()  # only a run whose two paths agree is a measurement


if __name__ == "__main__":
    try:
        main()
    except (ChatGLMError, _docs.DocsError) as e:
        _common.fail(str(e))
    except KeyboardInterrupt:
        _common.fail("已中断 / interrupted", 130)
