"""Hinton's KD as mdistiller's ImageNet baseline trains it, ResNet-34 -> ResNet-18
(``configs/imagenet/r34_r18/kd.yaml``; published: 71.03 % top-1); README.md has the command."""

base = "../imagenet_train_cfg.py"

overrides = {
    "distill.method": "kd",
    "distill.temperature": 1.0,
    "distill.alpha": 0.5,
    "distill.ce_weight": 0.5,
    "data.batch_size": 512,
    "optim.init_lr": 0.2,
    "optim.nesterov": False,  # mdistiller's SGD; step x0.1 every 30 epochs and wd 1e-4 as default
}
