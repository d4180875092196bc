from eval_helpers import tiny_openclip  # noqa: F401  (fixture)
