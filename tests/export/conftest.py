from export_helpers import tokenizer_dir  # noqa: F401  (fixture)
