"""ChatGLM3 configuration, with upstream's field names so the official config.json loads unchanged."""
import math

from transformers import PretrainedConfig

from chatglm3.errors import ChatGLMError


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(
        self,
        num_layers=28,
        padded_vocab_size=65024,
        hidden_size=4096,
        ffn_hidden_size=13696,
        kv_channels=128,
        num_attention_heads=32,
        seq_length=8192,
        hidden_dropout=0.0,
        classifier_dropout=None,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
        rmsnorm=True,
        apply_residual_connection_post_layernorm=False,
        post_layer_norm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        bias_dropout_fusion=True,
        multi_query_attention=False,
        multi_query_group_num=1,
        rope_ratio=1,
        apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,
        quantization_bit=0,
        pre_seq_len=None,
        prefix_projection=False,
        original_rope=True,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.vocab_size = padded_vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.original_rope = original_rope
        kwargs.setdefault("tie_word_embeddings", False)
        # ChatGLM3's eos and pad (<unk>), as the official config.json has them, also for configs built in code.
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)

    @property
    def num_key_value_groups(self) -> int:
        """Key/value heads: `multi_query_group_num` with multi-query attention, else one per attention head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads


def _integer(low, high=None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _number(test):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and test(v)


def _size(high):
    return (_integer(1, high), f"1 到 {high} 的整数", f"an integer from 1 to {high}")


# Upper bounds far above any ChatGLM (the 6B model: 28 layers, hidden 4096, 32 heads, seq_length 8192 to 128k):
# a size beyond them is a typo, and would be a MemoryError while the model is built on the meta device, before the
# memory check could say anything.
SIZE_LIMITS = {"num_layers": 1024, "padded_vocab_size": 2**22, "hidden_size": 2**17, "ffn_hidden_size": 2**19,
               "kv_channels": 2**12, "num_attention_heads": 2**12, "seq_length": 2**22, "multi_query_group_num": 2**12,
               "pre_seq_len": 2**16}
_PROBABILITY = (_number(lambda v: 0 <= v < 1), "[0, 1) 内的数", "a number in [0, 1)")
_POSITIVE = (_number(lambda v: v > 0), "有限的正数", "a finite number > 0")
_BOOLEAN = (lambda v: isinstance(v, bool), "true 或 false", "true or false")
# The config.json fields the model's shapes and arithmetic use, and what each must be: a wrong type or sign would
# otherwise surface as a traceback deep inside torch, or as NaN output.
FIELD_RULES = {
    **{name: _size(high) for name, high in SIZE_LIMITS.items()},
    **dict.fromkeys(("hidden_dropout", "attention_dropout", "classifier_dropout"), _PROBABILITY),
    **dict.fromkeys(("layernorm_epsilon", "rope_ratio"), _POSITIVE),
    **dict.fromkeys(("rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear",
                     "add_qkv_bias", "bias_dropout_fusion", "multi_query_attention", "apply_query_key_layer_scaling",
                     "attention_softmax_in_fp32", "fp32_residual_connection", "prefix_projection", "original_rope"),
                    _BOOLEAN),
    "quantization_bit": (_integer(0), "非负整数", "an integer >= 0"),
}
OPTIONAL_FIELDS = ("pre_seq_len", "classifier_dropout")  # null means "none"


def check_config_dict(data, where) -> None:
    """Raise ChatGLMError (one line naming `where` and the field) for a config.json (or from_pretrained's
    overrides) that is not an object, has a field of the wrong type or outside its range, or sizes that do not fit
    together. Runs before anything is built."""
    if not isinstance(data, dict):
        raise ChatGLMError(f"{where}: 应为 JSON 对象 / must be a JSON object, not {type(data).__name__}")
    for name, (ok, zh, en) in FIELD_RULES.items():
        if name in data and not (data[name] is None and name in OPTIONAL_FIELDS) and not ok(data[name]):
            shown = repr(data[name])[:40]
            raise ChatGLMError(f"{where}: 字段 {name} 应为{zh}，实际为 {shown} / field {name} must be {en}, got {shown}")
    heads, groups = data.get("num_attention_heads"), data.get("multi_query_group_num")
    if data.get("multi_query_attention") and heads and groups and heads % groups:
        raise ChatGLMError(f"{where}: multi_query_group_num={groups} 不能整除 num_attention_heads={heads} / field "
                           f"multi_query_group_num ({groups}) must divide num_attention_heads ({heads})")
    prefix, context = data.get("pre_seq_len"), data.get("seq_length")
    if prefix and context and prefix >= context:
        raise ChatGLMError(f"{where}: pre_seq_len={prefix} 不小于 seq_length={context}，前缀会占满上下文 / field pre_seq_len "
                           f"({prefix}) must be below seq_length ({context}): the prefix would fill the context")
