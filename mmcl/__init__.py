"""mmcl: CLIP-style contrastive training of transformers towers under DeepSpeed."""
__version__ = "0.1.0"
