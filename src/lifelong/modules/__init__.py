"""Small nn building blocks shared by every system's models (layers, heads, row features)."""
