"""Checkpoint formats and loading: upstream's folder layout (native), the one load plan (loading: Hub ids,
dtype, quantization, P-Tuning prefix, LoRA adapter), the memory pre-check, torch pickle files read safely,
and the exports (merged folders, transformers' GLM, GGUF)."""
