"""Alignment algorithms, one file each; every trainer sees only a backend and a reward function."""
