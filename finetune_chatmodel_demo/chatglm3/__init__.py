"""A native ChatGLM3 implementation: loads the official THUDM/chatglm3-6b files without remote code."""
from .configuration import ChatGLMConfig
from .conversation import parse_tool_call, process_response
from .errors import ChatGLMError
from .loading import load_model_and_tokenizer, load_ptuning_checkpoint, read_ptuning_config
from .model import ChatGLMForConditionalGeneration, ChatGLMModel
from .tokenizer import ChatGLMTokenizer

__all__ = [
    "ChatGLMConfig", "ChatGLMTokenizer", "ChatGLMForConditionalGeneration", "ChatGLMModel", "ChatGLMError",
    "load_model_and_tokenizer", "load_ptuning_checkpoint", "read_ptuning_config", "parse_tool_call",
    "process_response",
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


_register_auto_classes()
