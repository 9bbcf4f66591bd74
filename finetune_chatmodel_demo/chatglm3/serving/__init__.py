"""Serving: continuous batching (engine), OpenAI's Chat Completions API over it (openai_api), the tool loop, and
replies to many prompts at once for evaluation (batch_replies)."""
