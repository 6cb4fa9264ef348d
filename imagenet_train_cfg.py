"""Training configuration: edit this file, or override any key on the command line
(``data.data_path=/path/to/imagenet``). The original WSLD keys keep their defaults; keys marked
(new) are this repository's. README.md describes each key.
"""

from utils.config import AttrDict

cfg = AttrDict(
    # 'resnet': ResNet-34 teacher -> ResNet-18 student; 'mobilenet': ResNet-50 -> MobileNetV1.
    net_type="resnet",
    train_params=dict(
        epochs=100,
        use_seed=False,
        seed=0,
        print_freq=50,
        output_dir="",  # (new) '' means ./output/<net_type>
        amp="auto",  # (new) 'auto' | 'bf16' | 'fp16' | 'off'
        eval_teacher=True,  # (new) report the teacher's validation error before training
        max_steps_per_epoch=0,  # (new) 0 = whole epoch; a positive number cuts epochs short
        compile=False,  # (new) torch.compile the student and the teacher's forward
        quiet=False,  # (new) print one line per epoch; the rest goes to log.txt only
        curves=True,  # (new) redraw curves.png every epoch; False skips it (short test runs)
        checkpoint_every_min=15,  # (new) minutes, at least, between mid-epoch checkpoints; 0: none
    ),
    optim=dict(
        init_lr=0.1,
        min_lr=0,
        momentum=0.9,
        weight_decay=1e-4,
        nesterov=True,  # (new)
        lr_schedule="step",  # (new) 'step' (divide by 10 every lr_step_epochs) | 'cosine'
        lr_step_epochs=30,  # (new)
        lr_decay=0.1,  # (new)
        use_grad_clip=False,
        grad_clip=10,
        label_smooth=False,
        smooth_alpha=0.1,
        if_resume=False,
        resume_path="",  # a checkpoint file, or 'auto' for <output_dir>/checkpoint.pth.tar
        cosine=dict(
            use_restart=False,
            restart=dict(
                lr_period=[10, 20, 40, 80, 160, 320],
                lr_step=[0, 10, 30, 70, 150, 310],
            ),
        ),
    ),
    data=dict(
        data_path="/path/to/imagenet",
        # 'auto': each process's share of the machine's cores, less one or two for the training
        # loop itself; a number: the loader workers of a whole machine, shared by its processes
        num_workers="auto",
        batch_size=256,  # global batch, split evenly across processes
        dataset="imagenet",
        train_data_type="lmdb",  # 'lmdb' | 'img' (the JPEG class folders)
        val_data_type="lmdb",
        train_list="train_list.txt",  # (new) list files beside the split folders
        val_list="val_list.txt",  # (new)
        patch_dataset=False,
        num_examples=1281167,
        input_size=(3, 224, 224),
        type_of_data_aug="random_sized",  # 'random_sized' | 'rand_scale'
        random_sized=dict(min_scale=0.08),
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        color=False,
        decoder="auto",  # (new) 'auto' | 'region' | 'opencv': how random_sized crops are decoded
    ),
    model=dict(  # (new)
        num_classes=1000,
        teacher="",  # '' follows net_type; or resnet18 | resnet34 | resnet50 | mobilenet_v1
        student="",
        teacher_weights="torchvision",  # 'torchvision' (official weights) or a local file
        student_weights="",  # '' trains the student from scratch
    ),
    distill=dict(  # (new)
        method="wsld",  # 'wsld' | 'kd' | 'dkd' | 'dist' | 'none'
        temperature=2.0,  # every method's T (DKD's T, DIST's tau)
        alpha=2.5,  # weight of the distillation term: alpha * T^2 * term
        ce_weight=1.0,  # weight of the hard cross-entropy
        logit_standardization=False,  # standardise both logits in kd's, wsld's, dkd's soft term
        teacher_bn="running",  # 'running' (eval mode) | 'batch' (each process's batch, as original)
        dkd=dict(alpha=1.0, beta=0.5, warmup_epochs=1),  # TCKD, NCKD weights; epochs of warm-up
        dist=dict(beta=1.0, gamma=1.0),  # inter- (per sample) and intra-class (per class) weights
    ),
    dist=dict(  # (new)
        nprocs=0,  # 0: one process per visible GPU (one on the CPU); N: N processes
        backend="",  # '' picks nccl on CUDA, gloo on the CPU
        # Seconds a process waits on its peers before giving up: PyTorch's NCCL default, as a
        # first-step compilation, cuDNN autotuning or rank 0's slow checkpoint write keep the
        # others waiting; a process that dies stops the job at once anyway
        timeout_s=600,
    ),
)
