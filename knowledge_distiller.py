"""Distillation losses, ``loss(fc_s, fc_t, label)``, and the frozen-teacher wrapper.

``build_loss(cfg)`` picks the loss by ``cfg.distill.method``: the student alone, Hinton's KD, WSLD
(Zhou et al., ICLR 2021) and the methods it is compared with (DKD, DIST), each as its official code
computes it. All are float32 and, through ``stable_log_softmax``, accurate for certain networks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import build_model
from utils.config import require_choice
from utils.device import memory_format_for
from utils.errors import ConfigError

LOSS_METHODS = ("wsld", "kd", "dkd", "dist", "none")
STANDARDIZED_METHODS = ("kd", "wsld", "dkd")  # those whose soft term logit standardisation changes
TEACHER_BN_MODES = ("running", "batch")  # the teacher's BatchNorm statistics; see WSLDistiller

# Added to the teacher's cross-entropy before dividing, as in the paper: a certain, correct
# teacher (CE_t = 0) then gives the weight 1 wherever the student is not also certain.
WEIGHT_EPSILON = 1e-7


def stable_log_softmax(logits: Tensor) -> Tensor:
    """``log_softmax`` over dim 1, accurate to relative rounding even for near-certain rows.

    The usual form rounds the sum to 1, so a loss of 1e-9 reads as 0 (and the WSLD weight, a ratio
    of two, is off by 100%); here ``log1p`` takes the sum without the top class.
    """
    top, top_index = logits.max(dim=1, keepdim=True)
    shifted = logits - top
    rest = shifted.exp().scatter(1, top_index, 0.0).sum(dim=1, keepdim=True)
    return shifted - torch.log1p(rest)


def hard_cross_entropy(log_probs: Tensor, label: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample cross-entropy with the target ``(1 - eps) * one_hot + eps / C``, as torch's."""
    nll = -log_probs.gather(1, label.long().unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=1)


def standardize(logits: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024), with the official 1e-7 and unbiased std:
    the student need not match the teacher's logit range, only its shape."""
    return (logits - logits.mean(1, keepdim=True)) / (1e-7 + logits.std(1, keepdim=True))


def wsld_weights(ce_s: Tensor, ce_t: Tensor) -> Tensor:
    """``w_i = 1 - exp(-max(CE_s / (CE_t + 1e-7), 0))``, written without cancellation."""
    return -torch.expm1(-(ce_s / (ce_t + WEIGHT_EPSILON)).clamp_min(0.0))


def _number(key: str, value: object, positive: bool = False) -> float:
    """value as a float; ConfigError unless it is a finite non-negative (or positive) number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > 0 if positive else value >= 0)):
        kind = "positive" if positive else "non-negative"
        raise ConfigError(f"{key} must be a {kind} number, got {value!r}")
    return float(value)


class _ClassificationLoss(nn.Module):
    """Shared checks, the float32 loss ``ce_weight * CE(s, y)`` (with a teacher, plus
    ``alpha * T^2 * mean_i term_i``) and the batch statistics."""

    needs_teacher: bool = True
    epoch: int = 1  # 1-based, as the official DKD trainer counts; see set_epoch

    def __init__(self, num_classes: int = 1000, label_smoothing: float = 0.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.ce_weight = _number("distill.ce_weight", ce_weight)

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which epoch (from 1) is training, for losses with a warm-up."""
        self.epoch = epoch

    def _check(self, fc_s: Tensor, fc_t: Tensor | None, label: Tensor) -> None:
        if fc_s.dim() != 2 or fc_s.shape[1] != self.num_classes:
            raise ValueError(f"student logits must be N x {self.num_classes}, got "
                             f"{tuple(fc_s.shape)}; is num_classes the width of the classifier?")
        if label.shape != fc_s.shape[:1]:
            raise ValueError(f"labels must be a vector of {fc_s.shape[0]} class indices, got "
                             f"{tuple(label.shape)}")
        if self.needs_teacher and (fc_t is None or fc_t.shape != fc_s.shape):
            got = None if fc_t is None else tuple(fc_t.shape)
            raise ValueError(f"teacher logits must have the student's shape {tuple(fc_s.shape)}, "
                             f"got {got}")

    def forward(self, fc_s: Tensor, fc_t: Tensor | None, label: Tensor) -> Tensor:
        self._check(fc_s, fc_t, label)
        # Logits may arrive in bf16/fp16 from an autocast region; the loss is always float32.
        with torch.autocast(device_type=fc_s.device.type, enabled=False):
            fc_s = fc_s.float()
            log_probs_s = stable_log_softmax(fc_s)
            ce = hard_cross_entropy(log_probs_s, label, self.label_smoothing)
            hard = self.ce_weight * ce.mean()
            if not self.needs_teacher:
                return hard
            term = self.term(fc_s, fc_t.detach().float(), label, log_probs_s).mean()
            return hard + (self.alpha * self.temperature ** 2) * term

    def batch_stats(self, fc_s: Tensor, fc_t: Tensor | None, label: Tensor) -> dict[str, Tensor]:
        """Detached 0-dim float32 batch sums for the training log, on the device: with a teacher,
        ``regularisation_samples``, where the student beats it on the label (CE_s < CE_t)."""
        if not self.needs_teacher or fc_t is None:
            return {}
        with torch.autocast(device_type=fc_s.device.type, enabled=False), torch.no_grad():
            ce_s, ce_t = (hard_cross_entropy(stable_log_softmax(z.detach().float()), label)
                          for z in (fc_s, fc_t))
            stats = {"regularisation_samples": (ce_s < ce_t).float().sum()}
            return {**stats, **self._stats(ce_s, ce_t)}

    def _stats(self, ce_s: Tensor, ce_t: Tensor) -> dict[str, Tensor]:
        return {}

    def extra_repr(self) -> str:
        weight = f", ce_weight={self.ce_weight}" if self.ce_weight != 1.0 else ""
        return f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}{weight}"


class CrossEntropyLoss(_ClassificationLoss):
    """The student alone: (label-smoothed) cross-entropy; the teacher's logits are ignored."""

    needs_teacher = False


class _DistillationLoss(_ClassificationLoss):
    """The losses with a teacher, softened by temperature T; subclasses give term_i."""

    def __init__(self, temperature: float = 2.0, alpha: float = 2.5, num_classes: int = 1000,
                 label_smoothing: float = 0.0, ce_weight: float = 1.0,
                 standardize: bool = False) -> None:
        super().__init__(num_classes, label_smoothing, ce_weight)
        self.temperature = _number("distill.temperature", temperature, positive=True)
        self.alpha = _number("distill.alpha", alpha)
        self.standardize = bool(standardize)

    def soft_logits(self, fc_s: Tensor, fc_t: Tensor) -> tuple[Tensor, Tensor]:
        if self.standardize:
            fc_s, fc_t = standardize(fc_s), standardize(fc_t)
        return fc_s / self.temperature, fc_t / self.temperature

    def term(self, fc_s: Tensor, fc_t: Tensor, label: Tensor, log_probs_s: Tensor) -> Tensor:
        """The distillation term, per sample or already averaged, before ``alpha * T^2``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        standardize = ", logit_standardization=True" if self.standardize else ""
        return (f"temperature={self.temperature}, alpha={self.alpha}, " + super().extra_repr()
                + standardize)


class KDLoss(_DistillationLoss):
    """Hinton's knowledge distillation: ``CE(s, y) + alpha * T^2 * mean_i soft_i``, soft_i the
    cross-entropy of the softened outputs (the KL divergence plus the teacher's entropy, which has
    no gradient)."""

    def term(self, fc_s: Tensor, fc_t: Tensor, label: Tensor, log_probs_s: Tensor) -> Tensor:
        s, t = self.soft_logits(fc_s, fc_t)
        return -(F.softmax(t, dim=1) * stable_log_softmax(s)).sum(dim=1)


class WSLDLoss(KDLoss):
    """Weighted soft label distillation: ``CE(s, y) + alpha * T^2 * mean_i w_i * soft_i``.

    ``w_i`` (``wsld_weights``) from the raw, un-smoothed CE_s and CE_t: near 0 where the student
    already beats the teacher on the true class (the soft label would only add variance), near 1
    where it lags. It carries no gradient and ignores logit standardisation.
    """

    def sample_weights(self, log_probs_s: Tensor, fc_t: Tensor, label: Tensor) -> Tensor:
        with torch.no_grad():
            ce_t = hard_cross_entropy(stable_log_softmax(fc_t), label)
            return wsld_weights(hard_cross_entropy(log_probs_s.detach(), label), ce_t)

    def term(self, fc_s: Tensor, fc_t: Tensor, label: Tensor, log_probs_s: Tensor) -> Tensor:
        weights = self.sample_weights(log_probs_s, fc_t, label)
        return weights * super().term(fc_s, fc_t, label, log_probs_s)

    def _stats(self, ce_s: Tensor, ce_t: Tensor) -> dict[str, Tensor]:
        return {"weight_sum": wsld_weights(ce_s, ce_t).sum()}


def _kl(log_q: Tensor, log_p: Tensor, keep: Tensor | None = None) -> Tensor:
    """Per-row KL(q || p) from log-probabilities; entries outside ``keep`` (where both may be
    -inf) count 0, and their gradient is 0."""
    diff = log_q - log_p
    if keep is not None:
        diff = diff.masked_fill(~keep, 0.0)
    return (log_q.exp() * diff).sum(1)


class DKDLoss(_DistillationLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): ``term_i = warmup * (a * TCKD_i + b * NCKD_i)``,
    the KLs of softmax(z / T)'s binary (target, rest) and non-target distributions.

    Where the official code takes the log of summed probabilities and masks the target with -1000,
    the binary log-probabilities here come from the target logit and the log-sum-exp of the rest,
    and the mask is -inf, so certain networks stay finite.
    """

    def __init__(self, *args: object, dkd_alpha: float = 1.0, dkd_beta: float = 0.5,
                 warmup_epochs: float = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.dkd_alpha = _number("distill.dkd.alpha", dkd_alpha)
        self.dkd_beta = _number("distill.dkd.beta", dkd_beta)
        self.warmup_epochs = _number("distill.dkd.warmup_epochs", warmup_epochs)

    def term(self, fc_s: Tensor, fc_t: Tensor, label: Tensor, log_probs_s: Tensor) -> Tensor:
        s, t = self.soft_logits(fc_s, fc_t)
        target = label.long().unsqueeze(1)
        other = torch.ones_like(s, dtype=torch.bool).scatter_(1, target, False)

        def log_probs(z: Tensor) -> tuple[Tensor, Tensor]:  # binary (target, rest); non-target
            rest = z.masked_fill(~other, -math.inf)
            binary = torch.cat([z.gather(1, target), torch.logsumexp(rest, 1, keepdim=True)], 1)
            return stable_log_softmax(binary), stable_log_softmax(rest)

        (binary_s, rest_s), (binary_t, rest_t) = log_probs(s), log_probs(t)
        tckd = _kl(binary_t, binary_s)
        nckd = _kl(rest_t, rest_s, other)
        warmup = min(self.epoch / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0
        return warmup * (self.dkd_alpha * tckd + self.dkd_beta * nckd)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", dkd_alpha={self.dkd_alpha}, dkd_beta={self.dkd_beta}, "
                                       f"warmup_epochs={self.warmup_epochs}")


def _pearson_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - the mean over rows of the Pearson correlation of a's and b's rows, with the official
    code's 1e-8 in the denominator."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()


class DISTLoss(_DistillationLoss):
    """DIST (Huang et al., NeurIPS 2022): ``term = beta * inter + gamma * intra``, 1 - the mean
    Pearson correlation of softmax(z_s / T) and softmax(z_t / T) over each row (sample), and over
    each column (class) of this process's batch."""

    def __init__(self, *args: object, beta: float = 1.0, gamma: float = 1.0,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self.standardize:
            raise ConfigError("distill.logit_standardization applies to kd, wsld and dkd, not "
                              "dist; set it to False")
        self.beta = _number("distill.dist.beta", beta)
        self.gamma = _number("distill.dist.gamma", gamma)

    def term(self, fc_s: Tensor, fc_t: Tensor, label: Tensor, log_probs_s: Tensor) -> Tensor:
        p_s, p_t = (F.softmax(z, dim=1) for z in self.soft_logits(fc_s, fc_t))
        return (self.beta * _pearson_distance(p_s, p_t)
                + self.gamma * _pearson_distance(p_s.t(), p_t.t()))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta={self.beta}, gamma={self.gamma}"


def build_loss(cfg: Mapping) -> nn.Module:
    """The loss a whole configuration asks for (``distill.*``, ``model.num_classes``, the label
    smoothing of ``optim``), after checking every ``distill`` value once."""
    d = cfg["distill"]
    require_choice("distill.method", d["method"], LOSS_METHODS)
    require_choice("distill.teacher_bn", d["teacher_bn"], TEACHER_BN_MODES)
    if not isinstance(d["logit_standardization"], bool):
        raise ConfigError("distill.logit_standardization must be True or False, "
                          f"got {d['logit_standardization']!r}")
    if d["logit_standardization"] and d["method"] not in STANDARDIZED_METHODS:
        raise ConfigError(f"distill.logit_standardization applies to "
                          f"{', '.join(STANDARDIZED_METHODS)}, not {d['method']}; set it to False")
    for key in ("alpha", "beta", "warmup_epochs"):
        _number(f"distill.dkd.{key}", d["dkd"][key])
    for key in ("beta", "gamma"):
        _number(f"distill.dist.{key}", d["dist"][key])
    _number("distill.temperature", d["temperature"], positive=True)
    _number("distill.alpha", d["alpha"])
    optim = cfg["optim"]
    smoothing = optim["smooth_alpha"] if optim["label_smooth"] else 0.0
    base = (cfg["model"]["num_classes"], smoothing, d["ce_weight"])
    if d["method"] == "none":
        return CrossEntropyLoss(*base)
    # DKD's official loss has no weight beyond its own alpha and beta: distill.alpha is not its.
    alpha = 1.0 if d["method"] == "dkd" else d["alpha"]
    args = (d["temperature"], alpha, *base, d["logit_standardization"])
    if d["method"] == "dkd":
        return DKDLoss(*args, dkd_alpha=d["dkd"]["alpha"], dkd_beta=d["dkd"]["beta"],
                       warmup_epochs=d["dkd"]["warmup_epochs"])
    if d["method"] == "dist":
        return DISTLoss(*args, beta=d["dist"]["beta"], gamma=d["dist"]["gamma"])
    return (WSLDLoss if d["method"] == "wsld" else KDLoss)(*args)


def freeze(net: nn.Module) -> nn.Module:
    """Put net in eval mode with gradients off, in place; returns it."""
    return net.eval().requires_grad_(False)


class WSLDistiller(nn.Module):
    """A trainable student, a frozen teacher and the loss; ``forward(x, label)`` returns
    ``(student logits, loss, loss.batch_stats)``.

    The teacher is not a registered submodule, so the optimizer, DDP, ``train()`` and checkpoints
    never see it; ``.to()`` and the like still move it, through ``_apply``. ``teacher_bn``:
    ``'running'``, eval mode; ``'batch'``, train mode with each process's batch, as the original's
    ``t_net.train()``, BatchNorm not tracking, so the stored statistics never move.
    """

    def __init__(self, t_net: nn.Module | None, s_net: nn.Module, loss: nn.Module,
                 teacher_bn: str = "running") -> None:
        super().__init__()
        require_choice("distill.teacher_bn", teacher_bn, TEACHER_BN_MODES)
        if getattr(loss, "needs_teacher", True) and t_net is None:
            raise ValueError(f"{type(loss).__name__} needs a teacher, but none was given")
        self.student = s_net
        self.loss = loss
        self.teacher_bn = teacher_bn
        if t_net is not None and teacher_bn == "batch":
            for module in t_net.modules():
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                    module.track_running_stats = False
        # A plain attribute, bypassing nn.Module's registration (see the class docstring).
        object.__setattr__(self, "_teacher", None if t_net is None else freeze(t_net))

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the epoch now training, counted from 1 (DKD's warm-up reads it)."""
        self.loss.set_epoch(epoch)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> WSLDistiller:
        super()._apply(fn, recurse)
        if recurse and self._teacher is not None:
            self._teacher._apply(fn)
        return self

    def teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's float32 logits, without gradient, in the caller's autocast precision."""
        if self._teacher is None:
            raise RuntimeError("this distiller has no teacher")
        batch_stats = self.teacher_bn == "batch"
        if self._teacher.training != batch_stats:  # e.g. validation put it in eval mode
            self._teacher.train(batch_stats)
        with torch.no_grad():
            return self._teacher(x).float()

    def forward(self, x: Tensor, label: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        fc_t = self.teacher_logits(x) if self.loss.needs_teacher else None
        fc_s = self.student(x)
        return fc_s, self.loss(fc_s, fc_t, label), self.loss.batch_stats(fc_s, fc_t, label)

    def extra_repr(self) -> str:
        teacher = "None" if self._teacher is None else type(self._teacher).__name__
        return f"teacher={teacher} (frozen, not registered), teacher_bn={self.teacher_bn}"


def build_teacher(cfg: Mapping) -> nn.Module:
    """cfg.model's teacher, frozen, on the CPU."""
    model = cfg["model"]
    return freeze(build_model(model["teacher"], model["num_classes"], model["teacher_weights"]))


def build_distiller(cfg: Mapping, loss: nn.Module, device: torch.device) -> WSLDistiller:
    """cfg.model's student, and its teacher when the loss needs one, on device in its memory
    format."""
    model = cfg["model"]
    teacher = build_teacher(cfg) if loss.needs_teacher else None
    student = build_model(model["student"], model["num_classes"], model["student_weights"] or None)
    distiller = WSLDistiller(teacher, student, loss, teacher_bn=cfg["distill"]["teacher_bn"])
    return distiller.to(device, memory_format=memory_format_for(device))
