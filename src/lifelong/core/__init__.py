"""The foundation: errors, progress, console, typed configs, metrics, quantization, checkpoints."""
