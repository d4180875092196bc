"""Data curation: score, select and reinforce web image-text shards without rewriting them.

    mmcl curate score --model M --shards PATTERN --out DIR        similarity + embeddings per sample (score.py)
    mmcl curate select --scores DIR [rules] --out FILE            score filter, SemDeDup, MetaCLIP balancing
                                                                   (select.py; semdedup.py, balance.py, select_io.py)
    mmcl curate write --selection FILE --shards PATTERN --out DIR  a selection as new shards (write.py)
    mmcl curate reinforce --teacher T --shards PATTERN --augmentations K --out DIR
                                                                   K stored augmentations + teacher embeddings
                                                                   (reinforce_store.py)

Training reads a selection with `data.selection` (mmcl.data.selection) and a store with
`distill.store`. score and reinforce are shard-parallel jobs (sharded.py): one Parquet part per
input shard, split over the ranks of a `deepspeed` / `torchrun` launch, resumed by rerunning
the same command. The command line lives in cli.py (`add_curate_commands`, `run_curate`),
registered by `mmcl.cli`; formats and the order of the rules: docs/guides/curation.md.
"""
