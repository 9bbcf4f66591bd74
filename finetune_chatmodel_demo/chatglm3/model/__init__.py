"""The model core: ChatGLM3 as plain PyTorch modules (configuration, modeling), its tokenizer, its chat format
(conversation: special tokens, roles, tool-call syntax, stop tokens), and generation (a plain loop over the KV
cache, upstream's chat/stream_chat, attention for packed rows, the fused loss)."""
