"""DIST (Huang et al., NeurIPS 2022), ResNet-34 -> ResNet-18 on ImageNet, as
hunto/image_classification_sota's ``configs/strategies/distill/resnet_dist.yaml`` trains it
(32 images per GPU on 8 GPUs; published: 72.07 % top-1); README.md has the command."""

base = "../imagenet_train_cfg.py"

# Batch 256, lr 0.1, x0.1 every 30 epochs, 100 epochs and beta = gamma = 1 are the defaults.
overrides = {
    "distill.method": "dist",
    "distill.temperature": 1.0,
    "distill.alpha": 2.0,
}
