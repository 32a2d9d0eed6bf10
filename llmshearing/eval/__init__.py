"""Evaluation outside training: per-domain perplexity on shards and lm-eval tasks (`evaluate`)."""
