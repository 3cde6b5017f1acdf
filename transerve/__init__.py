"""transerve: an OpenAI-compatible inference server for Hugging Face transformers models."""

__version__ = "0.1.0"
