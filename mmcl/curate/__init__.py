"""Data curation: score, select and reinforce web image-text shards without rewriting them.

    mmcl curate score --model M --shards PATTERN --out DIR        similarity + embeddings per sample (score.py)
    mmcl curate reinforce --teacher T --shards PATTERN --augmentations K --out DIR
                                                                   K stored augmentations + teacher embeddings

Both are shard-parallel jobs (sharded.py): one Parquet part per input shard, split over the ranks
of a `deepspeed` / `torchrun` launch, resumed by rerunning the same command. The command line
lives in cli.py (`add_curate_commands`, `run_curate`), registered by `mmcl.cli`.
"""
