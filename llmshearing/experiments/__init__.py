"""End-to-end experiments: the demo, the paper's comparisons in miniature (`reproduce`), reference
losses for dynamic batch loading (`reference_losses`) and the tiny debug setup (`tiny`)."""
