"""Datasets: layouts, mask decoding, splits, synthetic data and inspection."""
