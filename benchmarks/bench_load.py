"""Peak memory of loading a checkpoint: does `from_pretrained` hold the weights once, or twice?

Writes a randomly initialised ChatGLM3 (default ~0.9 GB in float32) in the official sharded format, then loads it
in a fresh process and prints the weights' size beside the process's peak resident memory above its baseline
(Python + torch + transformers imported), right after loading and after every weight has been read once (loaded
tensors may be file-backed pages until touched). A loader that keeps a second copy shows about twice the weights.

    python benchmarks/bench_load.py                 # safetensors shards
    python benchmarks/bench_load.py --bin           # pytorch_model-*.bin shards (torch.load, weights_only, mmap)
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import DEMO  # noqa: E402  (the drop-in folder on sys.path)
from chatglm3 import ChatGLMConfig, ChatGLMForConditionalGeneration  # noqa: E402

LOADER = """
import sys
import torch, chatglm3
def peak_mb():
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's peak inherited at exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = peak_mb()
model = chatglm3.ChatGLMForConditionalGeneration.from_pretrained(sys.argv[1])
loaded = peak_mb()
with torch.no_grad():  # tensors may still be file-backed pages: read every weight once
    for p in model.parameters():
        p.sum()
print(base, loaded, peak_mb(), sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--bin", action="store_true", help="write .bin shards instead of safetensors")
    p.add_argument("--shard-size", default="200MB")
    a = p.parse_args(argv)
    config = ChatGLMConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.hidden // 64, kv_channels=64,
                           multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=a.hidden * 8 // 3,
                           add_qkv_bias=True, padded_vocab_size=65024)
    with tempfile.TemporaryDirectory() as tmp:
        model = ChatGLMForConditionalGeneration(config)
        model.save_pretrained(tmp, safe_serialization=not a.bin, max_shard_size=a.shard_size)
        del model
        files = sorted(f for f in Path(tmp).iterdir() if f.suffix in (".safetensors", ".bin"))
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        out = subprocess.run([sys.executable, "-c", LOADER, tmp], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(DEMO)})
        base, loaded, peak, weights = map(float, out.stdout.split())
    print(f"# bench_load.py: {len(files)} {'bin' if a.bin else 'safetensors'} shards, {size_mb:.0f} MB on disk")
    print(f"weights                                   {weights:6.0f} MB")
    print(f"peak RSS above baseline, after loading    {loaded - base:6.0f} MB  ({(loaded - base) / weights:.2f} x the weights)")
    print(f"peak RSS above baseline, weights all read {peak - base:6.0f} MB  ({(peak - base) / weights:.2f} x the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
