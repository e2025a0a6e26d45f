"""Bounds shared by the recipe schema and the CLI options (a module without imports, so the CLI starts fast)."""

SEED_MAX = 2**32 - 1  # NumPy's seed range; Ultralytics seeds NumPy with the training seed
IMGSZ_MAX = 4096  # the largest input side a recipe or an export/eval --imgsz may ask for
