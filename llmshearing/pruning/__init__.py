"""Structured pruning: hard-concrete masks and the Lagrangian (`masks`), shapes and targets (`shapes`),
the dense export of a masked model (`export`), and one-shot pruning baselines (`oneshot`)."""
