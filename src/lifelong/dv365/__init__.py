"""DV365's room: the foundation user embedding from multi-sliced lifelong timelines (FSA tower in a
DLRM backbone), its 4-bit export to a key-value store, the refresh schedule and downstream use."""
