"""Using what training produced: evaluation, sampling, Hugging Face export, and reading a
checkpoint's weights without DeepSpeed."""
