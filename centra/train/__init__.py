"""Training: settings, data readers, metrics, activation cache, fine-tuning, distillation, recipes, the
pipeline and its report. Imports only the core (and errors, io, progress)."""
