"""KD with logit standardisation (Sun et al., CVPR 2024), ResNet-34 -> ResNet-18 on ImageNet, as
its official runs (sunshangquan/logit-standardization-KD, mdistiller's ImageNet schedule; its
official log's best top-1: 71.45 %); README.md has the command."""

base = "../imagenet_train_cfg.py"

overrides = {
    "distill.method": "kd",
    "distill.logit_standardization": True,
    "distill.alpha": 9.0,  # temperature 2 and CE weight 1 are the defaults
    "data.batch_size": 512,
    "optim.init_lr": 0.2,
    "optim.nesterov": False,
}
