"""ChatGLM3 as plain PyTorch modules, with upstream's module and parameter names.

The official checkpoint's keys (`transformer.encoder.layers.0.self_attention.query_key_value.weight`, ...) map
one-to-one onto this module tree, so the files load unchanged. Layout is batch-first throughout ([b, s, h]);
upstream's sequence-first layout is an implementation detail that no checkpoint tensor depends on.

Attention masks: `attention_mask` is (batch, seq) with 0 for padding and, for sequence packing, segment ids
1, 2, 3, ... for the conversations packed into one row. A token attends causally to earlier tokens of its own
segment (an ordinary 0/1 mask is a single segment), plus the whole P-Tuning prefix. Packed rows attend per
conversation on the CPU (chatglm3/model/packed_attention.py), through a dense block-diagonal mask elsewhere.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from chatglm3.model import chat as chat_protocol
from chatglm3.checkpoint import native
from chatglm3.model.configuration import ChatGLMConfig
from chatglm3.model.fused_loss import fusable, linear_cross_entropy
from chatglm3.model.generation import generate as generate_tokens
from chatglm3.model.packed_attention import Segments, segment_attention

# One (key, value) pair per layer, each [batch, kv_groups, seq, kv_channels]. With P-Tuning the first
# `pre_seq_len` positions of every layer's cache are the prefix.
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class ChatGLMOutput(dict):
    """`loss`, `logits`, `past_key_values` as attributes and as dict keys (the HF Trainer reads
    outputs["loss"]). A plain class: transformers' ModelOutput renames fields between releases."""

    def __init__(self, loss=None, logits=None, past_key_values=None):
        if isinstance(loss, dict):  # rebuilt from a mapping: accelerate's bf16/fp16 output cast calls type(out)(dict)
            loss, logits, past_key_values = loss.get("loss"), loss.get("logits"), loss.get("past_key_values")
        fields = {"loss": loss, "logits": logits, "past_key_values": past_key_values}
        super().__init__({k: v for k, v in fields.items() if v is not None})
        self.loss, self.logits, self.past_key_values = loss, logits, past_key_values


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # promoted to float32, as upstream
        return (self.weight * x).to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary tables for the first half of each head's channels (ChatGLM's 2D-RoPE heritage).

    `inv_freq` is a persistent buffer only because the official checkpoint stores it; the tables are computed
    from the formula, as upstream does.
    """

    def __init__(self, dim: int, rope_ratio: float = 1.0, device=None):
        super().__init__()
        self.dim = dim
        self.base = 10000 * rope_ratio
        self.register_buffer("inv_freq", self.frequencies(device))

    def frequencies(self, device) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch, seq) positions -> (batch, seq, dim/2, 2) of (cos, sin)."""
        angles = position_ids.float()[..., None] * self.frequencies(position_ids.device)
        cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        # Upstream rounds the tables to the model's half-precision dtype.
        return cache.to(dtype) if dtype in (torch.float16, torch.bfloat16) else cache


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, d]; rope: [b, s, r/2, 2]. Rotates the first r channels in interleaved pairs."""
    rot_dim = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_rot = x_rot.reshape(*x_rot.shape[:-1], rot_dim // 2, 2)
    rope = rope[:, None]  # broadcast over heads
    cos, sin = rope[..., 0], rope[..., 1]
    x0, x1 = x_rot[..., 0], x_rot[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([out, x_pass], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_key_value_groups
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout
        qkv_size = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias, device=device)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear, device=device)

    def forward(self, x, rope, mask, kv_cache=None, use_cache=False):
        b, s, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        q, k, v = self.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_groups, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_groups, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if kv_cache is not None:  # the prefix or earlier tokens; no rotary is applied to them again
            k = torch.cat([kv_cache[0].to(k.dtype), k], dim=2)
            v = torch.cat([kv_cache[1].to(v.dtype), v], dim=2)
        new_cache = (k, v) if use_cache else None
        # Multi-query attention: head i reads key/value group i // (heads / groups).
        rep = self.num_heads // self.num_groups
        k_all = k.repeat_interleave(rep, dim=1)
        v_all = v.repeat_interleave(rep, dim=1)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, Segments):  # packed rows, no past: the cache holds the prefix only
            prefix_len = kv_cache[0].shape[2] if kv_cache is not None else 0
            out = segment_attention(q, k_all, v_all, mask, prefix_len, dropout)
        elif mask is None:  # plain causal attention over the whole row: lets SDPA pick its fastest kernel
            out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=s > 1, dropout_p=dropout)
        else:
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.dense(out), new_cache


class MLP(nn.Module):
    """SwiGLU: one fused up-projection holding the gate and the value halves."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear, device=device)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear, device=device)

    def forward(self, x):
        gate, value = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * value)


def _norm(config: ChatGLMConfig, device=None) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.post_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = _norm(config, device)
        self.self_attention = SelfAttention(config, device)
        self.post_attention_layernorm = _norm(config, device)
        self.mlp = MLP(config, device)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, rope, mask, kv_cache=None, use_cache=False):
        normed = self.input_layernorm(x)
        attn, new_cache = self.self_attention(normed, rope, mask, kv_cache, use_cache)
        x = (normed if self.post_residual else x) + self.hidden_dropout(attn)
        normed = self.post_attention_layernorm(x)
        x = (normed if self.post_residual else x) + self.hidden_dropout(self.mlp(normed))
        return x, new_cache


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, device) for _ in range(config.num_layers)])
        if config.post_layer_norm:
            self.final_layernorm = _norm(config, device)
        self.gradient_checkpointing = False

    def forward(self, x, rope, mask, kv_caches=None, use_cache=False):
        new_caches = []
        for i, layer in enumerate(self.layers):
            kv = kv_caches[i] if kv_caches is not None else None
            if self.gradient_checkpointing and self.training:
                # Non-reentrant: works when no input requires grad (frozen base under P-Tuning).
                x, cache = checkpoint(layer, x, rope, mask, kv, use_cache, use_reentrant=False)
            else:
                x, cache = layer(x, rope, mask, kv, use_cache)
            new_caches.append(cache)
        if hasattr(self, "final_layernorm"):
            x = self.final_layernorm(x)
        return x, (tuple(new_caches) if use_cache else None)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: `pre_seq_len` learned key/value vectors for every layer (upstream's module and names)."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * config.kv_channels * config.num_key_value_groups * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size, device=device)
        if self.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(config.hidden_size, kv_size, device=device),
            )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.prefix_projection else out


def build_attention_mask(
    attention_mask: Optional[torch.Tensor], query_len: int, past_len: int, prefix_len: int, device
) -> Optional[torch.Tensor]:
    """A boolean SDPA mask [b, 1, q, prefix + past + q] (True = may attend), or None for plain causal.

    `attention_mask` covers past and current real tokens (not the prefix): 0 = padding, k > 0 = segment k.
    """
    if attention_mask is None:
        attention_mask = torch.ones(1, past_len + query_len, dtype=torch.long, device=device)
    total = past_len + query_len
    if attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {total} (past {past_len} + new {query_len})")
    if prefix_len == 0 and past_len == 0 and bool((attention_mask == 1).all()):
        return None
    if prefix_len == 0 and query_len == 1 and bool((attention_mask == 1).all()):
        return None  # one new token attends to everything before it
    seg_k = attention_mask  # [b, total]
    seg_q = attention_mask[:, past_len:]  # [b, q]
    pos_k = torch.arange(total, device=device)
    pos_q = torch.arange(past_len, total, device=device)
    causal = pos_k[None, :] <= pos_q[:, None]  # [q, total]
    same = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] > 0)
    allowed = same & causal
    # A padding query would attend to nothing (NaN in SDPA); let it see itself. Its output is never used.
    allowed = allowed | (pos_k[None, :] == pos_q[:, None])
    if prefix_len:
        allowed = torch.cat([allowed.new_ones(allowed.shape[0], query_len, prefix_len), allowed], dim=-1)
    return allowed[:, None]


def position_ids_from_mask(attention_mask: torch.Tensor, past_len: int = 0) -> torch.Tensor:
    """Positions counting from 0 within each segment, skipping padding; for the last `q` tokens."""
    mask = attention_mask.long()
    # Position = number of earlier tokens in the same segment. Segments are contiguous, so a running count
    # restarted wherever the segment id changes gives it.
    b, n = mask.shape
    idx = torch.arange(n, device=mask.device).expand(b, n)
    starts = torch.ones_like(mask, dtype=torch.bool)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    pos = (idx - start_idx).masked_fill(mask == 0, 0)
    return pos[:, past_len:]


class ChatGLMModel(nn.Module):
    """The transformer (upstream's `transformer.*` submodule)."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.config = config
        self.num_layers = config.num_layers
        self.num_groups = config.num_key_value_groups
        self.head_dim = config.kv_channels
        self.embedding = Embedding(config, device)
        rotary_dim = config.hidden_size // config.num_attention_heads if config.kv_channels is None else config.kv_channels
        self.rotary_pos_emb = RotaryEmbedding(rotary_dim // 2, rope_ratio=getattr(config, "rope_ratio", 1), device=device)
        self.encoder = GLMTransformer(config, device)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
        self.pre_seq_len = config.pre_seq_len or 0
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config, device)
            self.prefix_dropout = nn.Dropout(0.1)  # upstream's dropout on the prefix keys/values

    def get_prompt(self, batch_size: int) -> KVCache:
        """The P-Tuning prefix as a KV cache for every layer (no rotary: the prefix has no position)."""
        device = self.prefix_encoder.embedding.weight.device
        tokens = torch.arange(self.pre_seq_len, device=device)
        kv = self.prefix_encoder(tokens)  # [pre, layers * 2 * groups * head_dim]
        kv = kv.to(self.embedding.word_embeddings.weight.dtype)
        kv = kv.view(self.pre_seq_len, self.num_layers * 2, self.num_groups, self.head_dim)
        kv = kv.unsqueeze(0).expand(batch_size, -1, -1, -1, -1)
        kv = self.prefix_dropout(kv)
        kv = kv.permute(2, 0, 3, 1, 4)  # [layers * 2, b, groups, pre, head_dim]
        return tuple((kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        b, s = input_ids.shape
        device = input_ids.device
        cache_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if past_key_values is None and self.pre_seq_len:
            past_key_values = self.get_prompt(b)
        past_len = max(cache_len - self.pre_seq_len, 0)  # real tokens already in the cache
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past_len, past_len + s, device=device).expand(b, s)
            else:
                position_ids = position_ids_from_mask(attention_mask, past_len)
        # Packed rows on the CPU: attention per conversation, none of the block-diagonal mask's wasted pairs. On a
        # GPU the dense mask keeps each layer's attention one fused kernel over the batch (a launch per
        # conversation would cost more than the pairs it skips).
        segments = Segments.from_mask(attention_mask) if device.type == "cpu" and past_len == 0 and attention_mask is not None else None
        mask = segments or build_attention_mask(attention_mask, s, past_len, self.pre_seq_len, device)
        x = self.embedding(input_ids)
        rope = self.rotary_pos_emb(position_ids, x.dtype)
        return self.encoder(x, rope, mask, past_key_values, use_cache)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    # The loss is a plain mean over labelled tokens; transformers must not pass num_items_in_batch and assume
    # the model rescales for gradient accumulation (forward takes **kwargs only for caller compatibility).
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        # Only used for fresh (tiny) models; real checkpoints overwrite every tensor. 0.02 is GPT-2's width-768
        # value; build_tiny_model.py --init-std records another in config.json (HF's `initializer_range`).
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(module.frequencies(module.inv_freq.device))


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__(config)
        self.transformer = ChatGLMModel(config, device)
        if config.pre_seq_len:
            # P-Tuning v2 trains only the prefix.
            for name, param in self.named_parameters():
                param.requires_grad = name.startswith(native.PREFIX_KEY)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self):
        return self.transformer.output_layer

    # Our own switch, not transformers' hook machinery (which changes between releases).
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.transformer.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.transformer.encoder.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.transformer.encoder.gradient_checkpointing

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        return_logits: Optional[bool] = None,
        return_last_logit: bool = False,
        **kwargs,
    ) -> ChatGLMOutput:
        """Logits are (batch, seq, padded_vocab). With `labels`, the loss is the mean cross-entropy over the
        labelled tokens (labels are shifted here: token i predicts label i+1; -100 is ignored) and logits are
        skipped unless `return_logits=True`: the output layer then runs only on labelled positions, so no
        float32 (batch, seq, 65024) tensor is ever built."""
        if use_cache is None:
            use_cache = labels is None and not self.training
        hidden, cache = self.transformer(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        loss = None
        if labels is not None:
            loss = self.loss(hidden, labels)
        logits = None
        if labels is None or return_logits:
            if return_last_logit:
                hidden = hidden[:, -1:]
            logits = self.transformer.output_layer(hidden)
        return ChatGLMOutput(loss=loss, logits=logits, past_key_values=cache)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        selected = targets != -100
        h = hidden[:, :-1][selected]  # [n_labelled, hidden]
        y = targets[selected]
        head = self.transformer.output_layer
        if fusable(head):  # output layer + cross-entropy in one blocked pass: the float32 logits never held whole
            return linear_cross_entropy(h, head.weight, y)
        logits = head(h).float()
        return logits.sum() if logits.shape[0] == 0 else F.cross_entropy(logits, y)  # an empty batch: a zero with a graph

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return native.load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, state_dict=None, safe_serialization=True, max_shard_size="2GB", is_main_process=True, **kwargs):
        if is_main_process:
            native.save_pretrained(self, save_directory, state_dict=state_dict, safe_serialization=safe_serialization, max_shard_size=max_shard_size)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        return generate_tokens(self, input_ids, attention_mask, **kwargs)

    @classmethod
    def can_generate(cls) -> bool:
        return False  # generate() is chatglm3.model.generation's, not transformers' GenerationMixin

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """The inputs of one decoding step. PEFT's wrapper for LoRA adapters of task type CAUSAL_LM (upstream's)
        requires this method; generate() itself does not call it."""
        if past_key_values is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values, "use_cache": True}

    def chat(self, tokenizer, query, history=None, role="user", **gen_kwargs):
        return chat_protocol.chat(self, tokenizer, query, history, role, **gen_kwargs)

    def stream_chat(self, tokenizer, query, history=None, role="user", **gen_kwargs):
        return chat_protocol.stream_chat(self, tokenizer, query, history, role, **gen_kwargs)
