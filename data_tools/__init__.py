"""Tools that turn images and captions into WebDataset shards, inspect them, and train tokenizers.

- `write_shards`: folder + table, Hugging Face `datasets`, or ImageNet-style folders -> shards
  in img2dataset's layout (`{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`, optional `{key}.cls`).
- `inspect_shards`: decode every sample of a shard set and report what is broken.
- `train_tokenizer`: a SentencePiece tokenizer from shard captions, saved for `AutoTokenizer`.
- `demo_dataset`: the offline demo set built from scikit-learn's digits.
"""
