"""Training data: reading and checking data files (reader), the data formats read besides ChatGLM3's own (formats:
OpenAI, ShareGPT, Alpaca), the two training formats (train_format) and upstream's example data sets (example_data)."""
