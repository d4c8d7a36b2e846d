"""diffgentor: a vLLM-style serving engine for HunyuanImage-3.0-Instruct."""

__version__ = "0.1.0"
