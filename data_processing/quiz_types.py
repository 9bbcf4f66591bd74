"""考一考微调后的模型：对训练集里的每只宝可梦问属性，统计回答中说对全部属性的比例。
Quiz a fine-tuned model: ask the type of every Pokémon named in a conversation file and report the share of
answers that name all of its true types (from the Pokémon table), plus a few answers beside the facts.

    python data_processing/quiz_types.py --model finetune_chatmodel_demo/output/full \
        --data finetune_chatmodel_demo/formatted_data/train.jsonl --table data_processing/data.csv
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from chatglm3 import ChatGLMError
# The model and generation flags of inference.py, so that every command loads models and decodes alike.
from chatglm3.cli import add_generation_args, add_model_args, check_generation_args, generation_kwargs, load_from_args
from chatglm3.json_files import DATA_LIMIT, read_text
from chatglm3.model.conversation import prompt_ids
from chatglm3.serving.batch_replies import generate_replies
from pokedex import load_table

HERE = Path(__file__).resolve().parent

QUESTION = "{}是什么属性的？"


def names_in(data_file: Path, names: list[str]) -> list[str]:
    """The table's Pokémon that the conversation file talks about, in table order."""
    text = read_text(data_file, DATA_LIMIT)  # a regular file (or pipe), bounded, UTF-8: one line otherwise
    return [n for n in names if n in text]


def ask(model, tokenizer, questions: list[str], gen_kwargs: dict, batch_size: int = 16) -> list[str]:
    """The answers to single-turn questions."""
    prompts = [prompt_ids(tokenizer, [], q) for q in questions]
    return generate_replies(model, tokenizer, prompts, batch_size, gen_kwargs)


def quiz(model, tokenizer, rows: list, gen_kwargs: dict) -> tuple[float, list[dict]]:
    answers = ask(model, tokenizer, [QUESTION.format(r.name) for r in rows], gen_kwargs)
    results = [{"name": r.name, "types": list(r.types), "answer": a, "correct": all(t in a for t in r.types)}
               for r, a in zip(rows, answers)]
    return 100.0 * sum(r["correct"] for r in results) / max(len(results), 1), results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p, max_new_tokens=32)
    p.add_argument("--data", required=True, type=Path, help="训练对话 JSON/JSONL，决定考哪些宝可梦 / conversations naming the Pokémon to quiz")
    p.add_argument("--table", default=str(HERE / "data.csv"), help="宝可梦表格（标准答案）/ Pokémon table with the true types")
    p.add_argument("--show", type=int, default=5, help="打印几条问答 / answers to print beside the facts")
    p.add_argument("--json", action="store_true", help="最后一行输出 JSON 摘要 / print a JSON summary as the last line")
    a = p.parse_args(argv)
    try:
        check_generation_args(a)
        table = load_table(a.table)
        by_name = table.by_name()
        rows = [by_name[n] for n in names_in(a.data, list(by_name))]
        if not rows:
            raise ChatGLMError(f"{a.data}: 没有提到表格里的任何宝可梦 / names no Pokémon of {a.table}")
        model, tokenizer = load_from_args(a)
    except ChatGLMError as e:
        print(f"错误 / Error: {e}", file=sys.stderr)
        return 1
    if a.seed is not None:
        torch.manual_seed(a.seed)
    accuracy, results = quiz(model, tokenizer, rows, generation_kwargs(a))
    for r in results[: a.show]:
        mark = "✓" if r["correct"] else "✗"
        print(f"{mark} 问 / Q: {QUESTION.format(r['name'])}  答 / A: {r['answer']}  （事实 / truth: {'、'.join(r['types'])}）")
    print(f"属性问答正确率 / type-question accuracy: {accuracy:.1f}% ({sum(r['correct'] for r in results)}/{len(results)} Pokémon)")
    if a.json:
        print(json.dumps({"type_accuracy": round(accuracy, 2), "pokemon": len(results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
