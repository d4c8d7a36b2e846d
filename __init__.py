"""diffgentor: a vLLM-style serving engine for HunyuanImage-3.0-Instruct."""

__version__ = "0.1.0"
# The distribution (what pip installs) has its own name: PyPI's `diffgentor` is an unrelated project, which
# `pip install -U diffgentor` would put over this checkout. The import package and the command stay `diffgentor`.
DISTRIBUTION = "hunyuanimage3-diffgentor"
