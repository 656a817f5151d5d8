"""DV365 foundation user embedding: multi-slicing of unified timelines and pooling (more to come)."""
