#!/usr/bin/env python
"""在验证集上评测 ChatGLM3：ROUGE-1/2/L 与 BLEU-4 / Score ChatGLM3 on a dev set with ROUGE-1/2/L and BLEU-4.

For every assistant message (with loss) of every conversation in --data (JSONL or a JSON list, the training
format), the model generates a reply from the conversation before it (same prompt format as training and
inference.py; batched, left padded, greedy unless --do-sample). Predictions and references are segmented with jieba and scored as upstream ChatGLM3's finetune
demo does (see metrics.py). Predictions are written beside their references to --output (JSONL); the last line
of stdout is the JSON summary {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "samples"}.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from chatglm3 import ChatGLMError, process_response
from inference import TOOL_SYSTEM_PROMPT, add_model_args, load_from_args
from metrics import METRIC_KEYS, compute_metrics, score_pair
from preprocess_utils import (CONVERSATION_KEY, FUNCTION_CALL_NAME, FUNCTION_CALL_POSTFIX, FUNCTION_CALL_PREFIX,
                              TOOL_DESC_KEY, format_function_call, load_conversations)

DEFAULT_OUTPUT = "output/eval_predictions.jsonl"


@dataclass
class EvalSample:
    location: str  # "file:line" of the conversation in --data
    turn: int  # index of the assistant message within the conversation
    history: List[dict]  # upstream chat history before the reply
    reference: str


# ---------------------------------------------------------------------------------------------------------------
# Reading the dev set
# ---------------------------------------------------------------------------------------------------------------
def to_history(sample: dict) -> Tuple[List[dict], List[int]]:
    """A checked multi-turn sample as upstream chat history (what tokenizer.build_chat_input renders, laid out as
    preprocess_utils.format_conversation lays out training data), and the indices in it of the replies to score:
    assistant messages with loss. Tool calls are context, not scored."""
    history, targets = [], []
    if TOOL_DESC_KEY in sample:
        history.append({"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": sample[TOOL_DESC_KEY]})
    for message in sample[CONVERSATION_KEY]:
        role = message["role"]
        if role == "tool":
            call = FUNCTION_CALL_PREFIX + format_function_call(FUNCTION_CALL_NAME, message["parameters"]) \
                + FUNCTION_CALL_POSTFIX
            observation = message.get("observation")
            if not isinstance(observation, str):
                observation = json.dumps(observation, ensure_ascii=False)
            history.append({"role": "assistant", "metadata": message["name"], "content": call})
            history.append({"role": "observation", "content": observation})
            continue
        if role == "assistant" and message.get("loss", True):
            targets.append(len(history))
        history.append({"role": role, "content": message["content"]})
    return history, targets


def load_samples(path: str, max_samples: Optional[int] = None) -> List[EvalSample]:
    """One EvalSample per loss-bearing assistant message that has something before it; bad files and samples
    raise DataFormatError (a ChatGLMError) naming file:line."""
    records = load_conversations(path)
    samples, no_context = [], 0
    for sample, location in zip(records, records.locations):
        history, targets = to_history(sample)
        for turn in targets:
            if turn == 0:
                no_context += 1
                continue
            samples.append(EvalSample(location, turn, history[:turn], history[turn]["content"]))
    if no_context:
        print(f"提示：跳过 {no_context} 条没有上文的助手消息 / Note: skipped {no_context} assistant message(s) "
              f"with nothing before them", file=sys.stderr)
    if not samples:
        raise ChatGLMError(f"错误：{path} 里没有可评测的助手回复（需要 assistant 消息）/ Error: {path} has no "
                           f"assistant reply to score")
    if max_samples is not None and len(samples) > max_samples:
        print(f"提示：只评测前 {max_samples} / {len(samples)} 条回复 / Note: scoring the first {max_samples} of "
              f"{len(samples)} replies (--max-samples)", file=sys.stderr)
        samples = samples[:max_samples]
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------
def build_prompt(tokenizer, history: List[dict]) -> List[int]:
    """Prompt ids for the reply after `history`: its last message is the query, the rest the chat history."""
    *before, last = history
    return tokenizer.build_chat_input(last["content"], history=before, role=last["role"])["input_ids"][0].tolist()


def clean_response(text: str) -> str:
    """The reply text as model.chat returns it (metadata line removed, stripped); a tool call stays as written."""
    response, _ = process_response(text, [])
    return response if isinstance(response, str) else text.strip()


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: List[List[int]], batch_size: int, gen_kwargs: Dict,
                     progress: bool = True) -> List[str]:
    """Replies to each prompt; prompts of similar length are batched together, left padded."""
    stop_ids = {tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: List[Optional[str]] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="生成 / generating", file=sys.stderr, disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = prompts[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                **gen_kwargs)
        for row, i in enumerate(batch):
            new_ids = output[row, width:].tolist()
            stop = next((k for k, t in enumerate(new_ids) if t in stop_ids), len(new_ids))
            replies[i] = clean_response(tokenizer.decode(new_ids[:stop]))
        bar.update(len(batch))
    bar.close()
    return replies


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="在验证集上计算 ROUGE 与 BLEU / Score a model on a dev set with ROUGE-1/2/L and BLEU-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--data", required=True,
                        help="验证集：JSONL（每行一个对话）或 JSON 列表，如 data_processing.py 的 --dev-output / dev set: "
                             "JSONL (one conversation a line) or a JSON list, e.g. data_processing.py's --dev-output")
    add_model_args(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="每批生成的样本数 / prompts per batch (8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="每条回复最多生成的 token 数 / most new tokens (128)")
    parser.add_argument("--max-samples", type=int, default=None, help="最多评测多少条回复 / score at most N replies")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"预测结果 JSONL（与参考答案并列）/ predictions beside references, JSONL ({DEFAULT_OUTPUT})")
    parser.add_argument("--do-sample", action="store_true", help="采样而非贪心解码 / sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.8, help="采样温度，配合 --do-sample / temperature (0.8)")
    parser.add_argument("--top-p", type=float, default=0.8, help="top-p，配合 --do-sample / top-p (0.8)")
    parser.add_argument("--seed", type=int, default=None, help="随机种子 / random seed")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise ChatGLMError(f"错误：{flag} 必须 ≥ 1（收到 {value}）/ Error: {flag} must be at least 1 (got {value})")


def evaluate(args: argparse.Namespace) -> Dict:
    """Generate, score and write predictions; returns the summary dict."""
    check_args(args)
    samples = load_samples(args.data, args.max_samples)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_from_args(args)

    limit = model.config.seq_length - args.max_new_tokens
    prompts = [build_prompt(tokenizer, s.history) for s in samples]
    fitting = [i for i, p in enumerate(prompts) if len(p) <= limit]
    if len(fitting) < len(samples):
        print(f"提示：跳过 {len(samples) - len(fitting)} 条过长的样本（输入超过 {limit} 个 token）/ Note: skipped "
              f"{len(samples) - len(fitting)} reply(s) whose prompt exceeds {limit} tokens (context length minus "
              f"--max-new-tokens)", file=sys.stderr)
    if not fitting:
        raise ChatGLMError("错误：所有样本都超过模型上下文长度 / Error: every prompt is longer than the model's context")
    samples = [samples[i] for i in fitting]
    prompts = [prompts[i] for i in fitting]

    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    predictions = generate_replies(model, tokenizer, prompts, args.batch_size, gen_kwargs)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for sample, prediction in zip(samples, predictions):
            record = {"location": sample.location, "turn": sample.turn, "query": sample.history[-1]["content"],
                      "prediction": prediction, "reference": sample.reference,
                      **score_pair(prediction, sample.reference)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"预测结果已写入 / Predictions written to {output}", file=sys.stderr)
    return compute_metrics(predictions, [s.reference for s in samples])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = evaluate(args)
    except ChatGLMError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps({key: summary[key] for key in (*METRIC_KEYS, "samples")}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
