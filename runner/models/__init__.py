"""Models: loading any supported causal LM with its tokenizer and the sha256 of its weights
(`loading`), the byte tokenizer of the tiny test models (`tokenizers`), and the MLX / JAX
forwards of the architectures those backends implement (`backends`)."""
