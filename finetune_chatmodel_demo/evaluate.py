#!/usr/bin/env python
"""在验证集上评测 ChatGLM3：ROUGE-1/2/L 与 BLEU-4 / Score ChatGLM3 on a dev set with ROUGE-1/2/L and BLEU-4.

For every assistant message (with loss) of every conversation in --data (JSONL or a JSON list, the training
format), the model generates a reply from the conversation before it (the prompt is training's ids up to the
reply; batched, left padded, greedy unless --do-sample). Predictions and references are segmented with jieba and
scored as upstream ChatGLM3's finetune demo does (see metrics.py). Predictions are written beside their
references to --output (JSONL); the last line of stdout is the JSON summary {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "samples"}.

With --tools FILE.py (tool plug-ins, docs/tools.md), every user turn is answered through the real tool loop instead
(the model's calls executed by the files' tools, observations fed back), and the summary adds tool_call_rate,
tool_false_call_rate, tool_name_accuracy, tool_args_exact, tool_args_chars and stopped_share (fractions 0-1, defined in
tool_eval.py), then the keys of the files' own metric functions (chatglm3.tools.register_metrics; the Pokédex's:
tool_answer_grounded, answer_types_correct); --hide-tools asks the same questions without the tools. --copy-loss
adds where the loss is: the copy_loss_* keys (tool_eval.py), the reference conversations' loss split into the
names a call copies, the values a reply copies, and the rest.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from chatglm3 import ChatGLMError
from chatglm3.serving.batch_replies import generate_replies
from chatglm3.model.conversation import prompt_ids, sample_to_messages
from chatglm3.data import formats
from chatglm3.data.reader import load_conversations, load_input_output
from chatglm3.json_files import dumps
from chatglm3.checkpoint.loading import input_files
from chatglm3.output_files import check_outputs, write_atomic
from chatglm3.data.train_format import raw_prompt_ids
from chatglm3.tools import load_tool_files, run_metrics
from chatglm3.cli import (add_format_arg, add_generation_args, add_model_args, check_generation_args, generation_kwargs,
                 load_from_args, prompt_format)
from metrics import METRIC_KEYS, compute_metrics, score_pair
from tool_eval import (COPY_LOSS_KEYS, TOOL_METRIC_KEYS, answer_items, copy_losses, conversation_items, tool_metrics,
                       turn_record)

DEFAULT_OUTPUT = "output/eval_predictions.jsonl"


@dataclass
class EvalSample:
    location: str  # "file:line" of the conversation in --data
    turn: int  # index of the reply within the conversation's messages
    history: List[dict]  # chat-history messages before the reply
    reference: str


def load_samples(path: str, max_samples: Optional[int] = None, data_format: str = "auto") -> List[EvalSample]:
    """One EvalSample per reply training learns (an assistant message with loss; tool calls are context, not
    scored) that has something before it; bad files and samples raise DataFormatError naming file:line."""
    records = load_conversations(path, data_format)
    samples, no_context = [], 0
    for sample, location in zip(records, records.locations):
        messages = sample_to_messages(sample)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant" or not message["loss"] or message.get("metadata"):
                continue
            if turn == 0:
                no_context += 1
                continue
            samples.append(EvalSample(location, turn, messages[:turn], message["content"]))
    if no_context:
        print(f"提示：跳过 {no_context} 条没有上文的助手消息 / Note: skipped {no_context} assistant message(s) "
              f"with nothing before them", file=sys.stderr)
    if not samples:
        raise ChatGLMError(f"错误：{path} 里没有可评测的助手回复（需要 assistant 消息）/ Error: {path} has no "
                           f"assistant reply to score")
    return first(samples, max_samples, "条回复", "replies")


def first(samples: list, max_samples: Optional[int], unit_zh: str, unit_en: str) -> list:
    """--max-samples: the first N, said on stderr when that leaves some out."""
    if max_samples is not None and len(samples) > max_samples:
        print(f"提示：只评测前 {max_samples} / {len(samples)} {unit_zh} / Note: scoring the first {max_samples} of "
              f"{len(samples)} {unit_en} (--max-samples)", file=sys.stderr)
        return samples[:max_samples]
    return samples


def input_output_samples(path: str, max_samples: Optional[int] = None, data_format: str = "auto") -> List[EvalSample]:
    """An input-output model's data ({"prompt", "response"}): each prompt alone, its response as the reference."""
    records = load_input_output(path, data_format)
    samples = [EvalSample(location, 0, [{"role": "user", "content": record["prompt"]}], record["response"])
               for record, location in zip(records, records.locations)]
    return first(samples, max_samples, "条样本", "samples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # an abbreviation (--out) would slip past the checks of the flag it stands for
        description="在验证集上计算 ROUGE 与 BLEU / Score a model on a dev set with ROUGE-1/2/L and BLEU-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--data", required=True,
                        help="验证集：JSONL（每行一个对话）或 JSON 列表，如 data_processing.py 的 --dev-output / dev set: "
                             "JSONL (one conversation a line) or a JSON list, e.g. data_processing.py's --dev-output")
    parser.add_argument("--data-format", "--data_format", dest="data_format", default="auto", choices=formats.CHOICES,
                        help="--data 的格式，默认自动识别 / format of --data (default: detected; docs/data.md)")
    add_model_args(parser)
    add_format_arg(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="每批生成的样本数 / prompts per batch (8)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="最多评测多少条回复（--tools：多少个用户问题）/ score at most N replies (--tools: N user turns)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"预测结果 JSONL（与参考答案并列）/ predictions beside references, JSONL ({DEFAULT_OUTPUT})")
    add_generation_args(parser, max_new_tokens=128)
    parser.add_argument("--tools", nargs="+", default=None, metavar="FILE.py",
                        help="评测工具调用：每个用户问题都走真实的工具循环，调用由这些工具文件（@register_tool，见 docs/tools.md）"
                             "执行，汇总里加上 tool_* 指标 / measure tool use: every user turn goes through the real "
                             "tool loop, calls executed by these tool files (@register_tool, see docs/tools.md); "
                             "adds the tool_* keys to the summary (see tool_eval.py)")
    parser.add_argument("--hide-tools", action="store_true",
                        help="配合 --tools：同样的问题，但不提供工具（无工具的对照）/ with --tools: the same questions "
                             "without offering the tool (the no-tool baseline)")
    parser.add_argument("--copy-loss", action="store_true",
                        help="配合 --tools：汇总里加上 copy_loss_*，即参考对话（按训练的方式读入）的损失按 token 写的是什么分开：调用里"
                             "名字的首个 token / 其余 token、回复里复述的参数、回复里抄的观察值、其余（见 tool_eval.py）/ with "
                             "--tools: add the copy_loss_* keys, the loss of the reference conversations (read as in "
                             "training) split by what each token writes: a call's argument (first token / the rest), "
                             "an argument again in a reply, an observation's value in a reply, the rest (tool_eval.py)")
    parser.set_defaults(plugin_metric_keys=[])  # the keys the tool files' metric functions add (evaluate_tools)
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--batch-size", args.batch_size), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise ChatGLMError(f"错误：{flag} 必须 ≥ 1（收到 {value}）/ Error: {flag} must be at least 1 (got {value})")
    check_generation_args(args)
    if args.hide_tools and not args.tools:
        raise ChatGLMError("错误：--hide-tools 需要 --tools / Error: --hide-tools needs --tools")
    if args.copy_loss and (not args.tools or args.hide_tools):
        raise ChatGLMError("错误：--copy-loss 需要 --tools，且不能和 --hide-tools 一起用 / Error: --copy-loss needs --tools "
                           "and cannot go with --hide-tools")
    # Before generation: --output may not replace the dev set, the table or a model file, nor be a directory.
    inputs = [("--data", args.data), *(("--tools", path) for path in args.tools or ()),
              *input_files(args.model, args.tokenizer, args.pt_checkpoint, args.adapter)]
    check_outputs(inputs=inputs, outputs={"--output": args.output})


def write_predictions(path: str, records: List[Dict]) -> None:
    output = Path(path)
    replaced = "（替换了旧文件）/ (replaced the previous file)" if output.exists() else ""
    write_atomic(output, "".join(dumps(record, str(output)) + "\n" for record in records))
    print(f"预测结果已写入 / Predictions written to {output} {replaced}".rstrip(), file=sys.stderr)


def evaluate_tools(args: argparse.Namespace) -> Dict:
    """--tools: every user turn answered through the real tool loop; ROUGE/BLEU of the final answers against the
    references, and the tool metrics (tool_eval.py)."""
    plugins = load_tool_files(args.tools)  # a bad tool file (or a table it reads) is reported before the model loads
    conversations = load_conversations(args.data)
    items = first(conversation_items(conversations, args.hide_tools), args.max_samples, "个用户问题", "user turns")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_from_args(args)
    turns = answer_items(model, tokenizer, items, {} if args.hide_tools else plugins.tools,
                         generation_kwargs(args), args.batch_size, model.config.seq_length - args.max_new_tokens)
    records = [turn_record(i, t) for i, t in zip(items, turns)]
    write_predictions(args.output, records)
    answered = [(t.answer or "", i.reference) for i, t in zip(items, turns) if i.reference is not None]
    summary = {**compute_metrics([a for a, _ in answered], [r for _, r in answered]), **tool_metrics(items, turns)}
    extra = run_metrics(plugins.metrics, records)
    if set(extra) & set(summary):
        raise ChatGLMError(f"错误：工具文件的指标函数用了已有的指标名 {sorted(set(extra) & set(summary))} / Error: a tool "
                           f"file's metric function returns keys evaluate.py already has: {sorted(set(extra) & set(summary))}")
    args.plugin_metric_keys = list(extra)  # printed after the generic keys
    if args.copy_loss:
        asked = {item.location for item in items}  # with --max-samples, the conversations of the turns asked
        scored = [sample for sample, where in zip(conversations, conversations.locations) if where in asked]
        summary.update(copy_losses(model, tokenizer, scored, model.config.seq_length))
    return {**summary, **extra}


def evaluate(args: argparse.Namespace) -> Dict:
    """Generate, score and write predictions; returns the summary dict."""
    check_args(args)
    if args.tools:
        return evaluate_tools(args)
    fmt = prompt_format(args)  # input-output models: the raw prompt, as trained
    samples = (input_output_samples if fmt == "input-output" else load_samples)(args.data, args.max_samples, args.data_format)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_from_args(args)

    limit = model.config.seq_length - args.max_new_tokens
    prompts = [raw_prompt_ids(tokenizer, s.history[-1]["content"]) if fmt == "input-output"
               else prompt_ids(tokenizer, s.history) for s in samples]
    fitting = [i for i, p in enumerate(prompts) if len(p) <= limit]
    if len(fitting) < len(samples):
        print(f"提示：跳过 {len(samples) - len(fitting)} 条过长的样本（输入超过 {limit} 个 token）/ Note: skipped "
              f"{len(samples) - len(fitting)} reply(s) whose prompt exceeds {limit} tokens (context length minus "
              f"--max-new-tokens)", file=sys.stderr)
    if not fitting:
        raise ChatGLMError("错误：所有样本都超过模型上下文长度 / Error: every prompt is longer than the model's context")
    samples = [samples[i] for i in fitting]
    prompts = [prompts[i] for i in fitting]

    predictions = generate_replies(model, tokenizer, prompts, args.batch_size, generation_kwargs(args))
    write_predictions(args.output, [{"location": s.location, "turn": s.turn, "query": s.history[-1]["content"],
                                     "prediction": p, "reference": s.reference, **score_pair(p, s.reference)}
                                    for s, p in zip(samples, predictions)])
    return compute_metrics(predictions, [s.reference for s in samples])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = evaluate(args)
    except ChatGLMError as exc:
        print(exc, file=sys.stderr)
        return 2
    keys = (*METRIC_KEYS, "samples", *((*TOOL_METRIC_KEYS, *args.plugin_metric_keys) if args.tools else ()),
            *(COPY_LOSS_KEYS if args.copy_loss else ()))
    try:
        print(dumps({key: summary[key] for key in keys}, "汇总 / the summary"))
    except ChatGLMError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
