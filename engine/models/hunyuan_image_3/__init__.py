"""HunyuanImage-3.0 (base / Instruct / Instruct-Distil), loaded from the official checkpoint layout."""
