"""The model: one decoder for LLaMA-family checkpoints (`decoder`), HF configs and weights in (`hf`),
and the Composer wrapper with its loss, metrics and FSDP hooks (`composer_model`)."""
