"""Resume cost of the allow-listed loader: a DeepSpeed ZeRO-2 checkpoint with ChatGLM3-6B's 172 tensors at 1/WIDTH
of its hidden size (model states bf16, optimizer states fp32 with a LossScaler and fragment addresses) is written to
OUT_DIR, then read three times each way: as DeepSpeed reads it (torch.load, weights_only=False), through
chatglm3.checkpoint.torch_files.torch_load, and by the pre-resume check (torch_files.verify_checkpoint); medians.

    python benchmarks/bench_resume.py OUT_DIR 16     # 0.73 GiB
    python benchmarks/bench_resume.py OUT_DIR 8      # about 2 GiB
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import _common  # noqa: F401  (the drop-in folder on sys.path)
import deepspeed  # noqa: F401  (its classes are in the optimizer states)
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from chatglm3.checkpoint import torch_files
from chatglm3.model.configuration import ChatGLMConfig
from chatglm3.model.modeling import ChatGLMForConditionalGeneration

out = Path(sys.argv[1]); step = out / "global_step1"; step.mkdir(parents=True, exist_ok=True)
w = int(sys.argv[2])  # 16: 0.73 GiB, 8: 2.2 GiB
config = ChatGLMConfig(hidden_size=4096 // w, ffn_hidden_size=13696 // w, kv_channels=128 // w, multi_query_attention=True,
                       multi_query_group_num=2)
with torch.device("meta"):
    shapes = {k: v.shape for k, v in ChatGLMForConditionalGeneration(config).state_dict().items()}
module = {k: torch.randn(s, dtype=torch.bfloat16) for k, s in shapes.items()}
n = sum(v.numel() for v in module.values())
torch.save({"module": module, "ds_version": "0.19.8", "global_steps": 1}, step / "mp_rank_00_model_states.pt")
flat = torch.randn(n)
optim = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
         "single_partition_of_fp32_groups": [flat],
         "base_optimizer_state": {"state": {0: {"exp_avg": flat.clone(), "exp_avg_sq": flat.clone(), "step": torch.tensor(1.0)}}},
         "param_slice_mappings": [{k: fragment_address(numel=1, start=0) for k in shapes}]}, "ds_version": "0.19.8"}
torch.save(optim, step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
files = sorted(step.glob("*.pt"))
size = sum(f.stat().st_size for f in files)
print(f"{len(shapes)} tensors, {n/1e6:.0f}M parameters, {size/2**30:.2f} GiB in {len(files)} files")

def unsafe():
    for f in files: torch.load(f, map_location="cpu", weights_only=False)
def safe():
    for f in files: torch_files.torch_load(f, map_location="cpu")
def verify():
    torch_files.verify_checkpoint(out)
times = {"torch.load(weights_only=False)": [], "torch_files.torch_load": [], "torch_files.verify_checkpoint": []}
for _ in range(3):
    for (name, fn) in zip(times, (unsafe, safe, verify)):
        t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print(f"{name:32s} median {statistics.median(ts):.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})")
