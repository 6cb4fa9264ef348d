"""ImageNet data: lists, the LMDB format, datasets, augmentations and loaders."""
