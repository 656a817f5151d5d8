"""Feature engineering: quantization, item embeddings, NN selection and S_all assembly, DV365 slicing."""
