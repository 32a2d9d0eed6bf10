"""Training data: the per-domain shard layout (`layout`), tokenizers (`tokenizer`), the dynamic
mixture sampler (`mixture`) and the rule that moves its weights (`reweighting`)."""
