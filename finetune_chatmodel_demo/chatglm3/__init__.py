"""A native ChatGLM3 implementation: loads the official THUDM/chatglm3-6b files without remote code."""
from chatglm3.model.configuration import ChatGLMConfig
from chatglm3.model.conversation import parse_tool_call, process_response
from chatglm3.errors import ChatGLMError
from chatglm3.checkpoint.loading import load_model_and_tokenizer, load_ptuning_checkpoint, read_ptuning_config
from chatglm3.model.modeling import ChatGLMForConditionalGeneration, ChatGLMModel
from chatglm3.model import tokenizer
from chatglm3.model.tokenizer import ChatGLMTokenizer
from chatglm3.tools import register_tool

__all__ = [
    "ChatGLMConfig", "ChatGLMTokenizer", "ChatGLMForConditionalGeneration", "ChatGLMModel", "ChatGLMError",
    "load_model_and_tokenizer", "load_ptuning_checkpoint", "read_ptuning_config", "parse_tool_call",
    "process_response", "register_tool",
]


def _register_auto_classes():
    """`AutoModel.from_pretrained(dir)` etc. work for `model_type: chatglm` after `import chatglm3`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        AutoConfig.register("chatglm", ChatGLMConfig)
    except ValueError:  # already registered (module imported twice under different names)
        return
    AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration)
    AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration)
    AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer)
    _prefer_our_tokenizer(AutoTokenizer)


def _prefer_our_tokenizer(auto_tokenizer):
    """`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`, as every upstream script writes it, gets our
    ChatGLMTokenizer like AutoModel gets our model: the folder's `tokenization_chatglm.py` (named by auto_map in
    tokenizer_config.json) is never imported. transformers 5 only skips remote code for a registered class whose
    config is not in its tokenizer mapping, and 4.x never does, so the choice is made here, before transformers'."""
    original = auto_tokenizer.from_pretrained
    if getattr(original, "_chatglm3", False):
        return

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if tokenizer.names_chatglm_tokenizer(pretrained_model_name_or_path, kwargs):
            kwargs.pop("trust_remote_code", None)
            return ChatGLMTokenizer.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return original(pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._chatglm3 = True
    auto_tokenizer.from_pretrained = classmethod(from_pretrained)


_register_auto_classes()
