"""WSLD as the original code trained it, for the paper's 72.04 % (ResNet-34 -> ResNet-18).

Run it on 8 processes with the default global batch of 256, so that each normalises the teacher
with the 32 images a replica of the original's DataParallel did. README.md ("Differences from the
original code") has the command, what this file changes and what stays different.
"""

base = "../imagenet_train_cfg.py"

overrides = {
    # The original calls t_net.train() each epoch: its teacher normalises with each replica's batch.
    "distill.teacher_bn": "batch",
    "train_params.epochs": 101,  # its loop is range(0, epochs + 1)
    "train_params.amp": "off",  # it trains in float32
}
