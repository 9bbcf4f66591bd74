"""导出完整的模型目录：把 LoRA 适配器合并进基座，或转换基座/全参微调检查点，写成官方 ChatGLM3 格式或 transformers 内置的
GLM 格式 / Export a complete model folder: merge a LoRA adapter into its base, or convert a base or full fine-tuning
checkpoint, in the official ChatGLM3 layout or as transformers' built-in GLM (GlmForCausalLM, no remote code)."""
import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (puts the drop-in folder first on sys.path)

from chatglm3 import ChatGLMError  # noqa: E402
from chatglm3.checkpoint.export import FORMATS, export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="基座模型或全参微调检查点目录 / base model or full fine-tuning checkpoint folder")
    p.add_argument("--adapter", default=None, help="要合并的 LoRA 适配器目录（PEFT 格式）/ LoRA adapter folder to merge (PEFT format)")
    p.add_argument("--tokenizer", default=None, help="分词器目录，默认与 --model 相同 / tokenizer folder (default: --model)")
    p.add_argument("--output", required=True, help="输出目录 / output folder")
    p.add_argument("--format", default="chatglm", choices=FORMATS,
                   help="chatglm: 官方 ChatGLM3 格式（默认）/ the official ChatGLM3 layout (default); "
                        "hf-glm: transformers 内置 GlmForCausalLM / transformers' built-in GlmForCausalLM; "
                        "gguf: llama.cpp / Ollama / LM Studio 用的单个 .gguf 文件和 Ollama Modelfile / one .gguf file "
                        "for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile")
    p.add_argument("--gguf-type", default=None,
                   help="GGUF 权重类型 / GGUF weight type: f32, f16 (默认 default), bf16, q8_0, q4_k_m, q5_k_m "
                        "(后两种需要 llama-cpp-python / the last two need llama-cpp-python)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="权重精度，默认与输入检查点相同 / weight dtype (default: the checkpoint's own)")
    p.add_argument("--max-shard-size", default="2GB", help="每个 safetensors 分片的上限 / largest safetensors shard (default 2GB)")
    p.add_argument("--force", action="store_true", help="输出目录非空时替换它 / replace a non-empty output folder")
    a = p.parse_args(argv)
    try:
        out = export(a.model, a.output, a.format, adapter_dir=a.adapter, dtype=a.dtype, force=a.force,
                     max_shard_size=a.max_shard_size, tokenizer_dir=a.tokenizer, gguf_type=a.gguf_type)
    except ChatGLMError as e:
        print(f"错误 / Error: {e}", file=sys.stderr)
        return 1
    print(f"已导出 / exported ({a.format}): {out}")
    if a.format == "gguf":  # chatglm3.checkpoint.gguf wrote the Modelfile beside the .gguf
        print(f"导入 Ollama / import into Ollama: cd {out} && ollama create {out.name} -f Modelfile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
