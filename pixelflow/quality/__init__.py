"""Judging samples: Inception features and scores (FID, sFID, IS, precision/recall), and a class-accuracy
check with a small classifier for the synthetic demo data."""
