"""The model: one decoder for LLaMA-family checkpoints (`decoder`), the families' rules from HF configs (`hf`), and
HF model folders checked and loaded into it (`loading`)."""
