"""Bytes in and out: NIfTI volumes with geometry, 2D images, user URLs, mask encodings, polygons."""
