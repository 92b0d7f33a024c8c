"""Segmentation steps over engines: windowing, 3D propagation, 2D prompts, automatic masks, video tracking."""
