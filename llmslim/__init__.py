"""llmslim: compress Hugging Face causal language models from declarative YAML recipes."""

__version__ = "0.1.0"
