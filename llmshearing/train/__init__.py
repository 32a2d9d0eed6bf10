"""Training: the typed config (`config`), builders from config to Composer Trainer (`builders`),
running a stage (`run`) and checkpoints (`checkpointing`)."""
