"""Data curation: score image-text pairs, select a subset (score filter, semantic dedup, balancing), write it.

    mmcl curate select --scores DIR [rules] --out FILE      (select.py; semdedup.py, balance.py, select_io.py)
    mmcl curate write --selection FILE --shards PATTERN --out DIR   (write.py)

Formats and the order of the rules: docs/guides/curation.md.
"""
