"""DKD (Zhao et al., CVPR 2022), ResNet-34 -> ResNet-18 on ImageNet, as mdistiller's
``configs/imagenet/r34_r18/dkd.yaml`` trains it (published: 71.70 % top-1); README.md has the
command."""

base = "../imagenet_train_cfg.py"

overrides = {
    "distill.method": "dkd",
    "distill.temperature": 1.0,
    # distill.dkd keeps the defaults, which are this recipe's: alpha 1, beta 0.5, warm-up 1 epoch
    "data.batch_size": 512,
    "optim.init_lr": 0.2,
    "optim.nesterov": False,  # mdistiller's SGD; step x0.1 every 30 epochs and wd 1e-4 as default
}
