"""Training and test data for Turbo4D: procedural scenes with exact multi-view, multi-frame ground truth."""
