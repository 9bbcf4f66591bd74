class ChatGLMError(ValueError):
    """A bad checkpoint, config or input, with a message for the user."""
