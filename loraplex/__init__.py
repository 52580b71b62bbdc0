"""loraplex: self-hosted LLM serving and LoRA fine-tuning. The console script lives in loraplex.cli."""

__version__ = "0.1.0"
