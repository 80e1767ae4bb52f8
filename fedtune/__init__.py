"""fedtune: federated finetuning of LLMs with LoRA-family adapters."""

__version__ = "0.1.0"
