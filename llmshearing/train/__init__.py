"""Training: the typed config (`config`), builders from config to Composer Trainer (`builders`), the Composer wrapper
of the model (`composer_model`), running a stage (`run`), checkpoint files (`checkpointing`), a run read back from
one (`restore`) and a run's export (`export_run`)."""
