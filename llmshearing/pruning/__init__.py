"""Structured pruning: hard-concrete masks and the Lagrangian (`masks`), shapes (`shapes`), targets (`target`, `budget`),
the dense export of a masked model (`export`), and one-shot pruning baselines (`oneshot`)."""
