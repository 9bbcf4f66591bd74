"""Training data: reading and checking data files (reader), the two
training formats (train_format) and upstream's example data sets (example_data)."""
