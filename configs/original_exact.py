"""WSLD as the original code trained it, for the paper's 72.04 % (ResNet-34 -> ResNet-18).

    python3 train_with_distillation.py --cfg configs/original_exact.py data.data_path=DIR

Run it on 8 processes (one per GPU) with the default global batch of 256, so that each process
normalises the teacher with the same 32 images a replica of the original's DataParallel did.
README.md ("Differences from the original code") lists what this file changes and what stays
different.
"""

base = "../imagenet_train_cfg.py"

overrides = {
    # The original calls t_net.train() every epoch: its teacher normalises with each replica's
    # batch.
    "distill.teacher_bn": "batch",
    "train_params.epochs": 101,  # its loop is range(0, epochs + 1)
    "train_params.amp": "off",  # it trains in float32
}
