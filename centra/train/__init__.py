"""Training: data readers, metrics, activation cache, fine-tuning, distillation, recipes, the pipeline.
Imports only the core (and errors, io, progress)."""
