"""lorafleet: fine-tune, merge and serve LoRA adapters."""
__version__ = "0.1.0"
