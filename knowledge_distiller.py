"""Distillation losses and the teacher-student wrapper.

Three losses share one signature, ``loss(fc_s, fc_t, label)``, so that ``cfg.distill.method``
picks a row of the paper's table: ``none`` (the student alone), ``kd`` (Hinton et al.) and
``wsld`` (Zhou et al., ICLR 2021, weighted soft labels). ``WSLDistiller`` runs a frozen teacher
beside the student and hands both outputs to the loss.

All losses are computed in float32 from log-probabilities that stay accurate when a network is
certain (see ``stable_log_softmax``), so they match the paper's equation to float32 rounding
for any finite logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.config import require_choice
from utils.errors import ConfigError

LOSS_METHODS = ("wsld", "kd", "none")

# Added to the teacher's cross-entropy before dividing, as in the paper: a certain, correct
# teacher (CE_t = 0) then gives the weight 1 wherever the student is not also certain.
WEIGHT_EPSILON = 1e-7


def stable_log_softmax(logits: Tensor) -> Tensor:
    """``log_softmax`` over dim 1, accurate to relative rounding even for near-certain rows.

    The usual ``x - max - log(sum(exp(x - max)))`` rounds ``sum`` to 1 when every other class
    is far below the top one, so a confident network's loss of 1e-9 reads as 0 (and the WSLD
    weight, a ratio of two such losses, can be wrong by 100%). Here the top class is left out
    of the sum and ``log1p`` takes the remainder, so no term cancels.
    """
    top, top_index = logits.max(dim=1, keepdim=True)
    shifted = logits - top
    rest = shifted.exp().scatter(1, top_index, 0.0).sum(dim=1, keepdim=True)
    return shifted - torch.log1p(rest)


def hard_cross_entropy(log_probs: Tensor, label: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample cross-entropy with the label, smoothed toward the uniform distribution.

    With smoothing eps the target is ``(1 - eps) * one_hot + eps / C`` (as torch and the
    original's label-smoothing loss define it).
    """
    nll = -log_probs.gather(1, label.long().unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=1)


def soft_cross_entropy(fc_s: Tensor, fc_t: Tensor, temperature: float) -> Tensor:
    """Per-sample cross-entropy between the teacher's and the student's softened distributions.

    The cross-entropy, not the KL divergence: it is the paper's ``soft_i`` and Hinton's soft
    target loss; the two differ by the teacher's entropy, which has no gradient.
    """
    teacher_probs = F.softmax(fc_t / temperature, dim=1)
    return -(teacher_probs * stable_log_softmax(fc_s / temperature)).sum(dim=1)


class _ClassificationLoss(nn.Module):
    """Shared checks and the float32 hard term of the three losses."""

    needs_teacher: bool = True

    def __init__(self, num_classes: int = 1000, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)

    def _check(self, fc_s: Tensor, fc_t: Tensor | None, label: Tensor) -> None:
        if fc_s.dim() != 2 or fc_s.shape[1] != self.num_classes:
            raise ValueError(f"student logits must be N x {self.num_classes}, got {tuple(fc_s.shape)}; "
                             "is num_classes the width of the classifier?")
        if label.shape != fc_s.shape[:1]:
            raise ValueError(f"labels must be a vector of {fc_s.shape[0]} class indices, got {tuple(label.shape)}")
        if self.needs_teacher and (fc_t is None or fc_t.shape != fc_s.shape):
            got = None if fc_t is None else tuple(fc_t.shape)
            raise ValueError(f"teacher logits must have the student's shape {tuple(fc_s.shape)}, got {got}")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}"


class CrossEntropyLoss(_ClassificationLoss):
    """The student alone: (label-smoothed) cross-entropy; the teacher's logits are ignored."""

    needs_teacher = False

    def forward(self, fc_s: Tensor, fc_t: Tensor | None, label: Tensor) -> Tensor:
        self._check(fc_s, fc_t, label)
        with torch.autocast(device_type=fc_s.device.type, enabled=False):
            log_probs = stable_log_softmax(fc_s.float())
            return hard_cross_entropy(log_probs, label, self.label_smoothing).mean()


class _SoftLabelLoss(_ClassificationLoss):
    """Hard cross-entropy plus ``alpha * T^2`` times a per-sample weighted soft term."""

    def __init__(self, temperature: float = 2.0, alpha: float = 2.5, num_classes: int = 1000,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(num_classes, label_smoothing)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ConfigError(f"temperature must be a positive number, got {temperature}")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ConfigError(f"alpha must be a non-negative number, got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def sample_weights(self, log_probs_s: Tensor, fc_t: Tensor, label: Tensor) -> Tensor | None:
        """Per-sample weights of the soft term, or None for all ones."""
        return None

    def forward(self, fc_s: Tensor, fc_t: Tensor, label: Tensor) -> Tensor:
        self._check(fc_s, fc_t, label)
        # Logits may arrive in bf16/fp16 from an autocast region; the loss is always float32.
        with torch.autocast(device_type=fc_s.device.type, enabled=False):
            fc_s, fc_t = fc_s.float(), fc_t.detach().float()
            log_probs_s = stable_log_softmax(fc_s)
            hard = hard_cross_entropy(log_probs_s, label, self.label_smoothing).mean()
            soft = soft_cross_entropy(fc_s, fc_t, self.temperature)
            weights = self.sample_weights(log_probs_s, fc_t, label)
            if weights is not None:
                soft = weights * soft
            return hard + (self.alpha * self.temperature ** 2) * soft.mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, " + super().extra_repr()


class KDLoss(_SoftLabelLoss):
    """Hinton's knowledge distillation: ``CE(s, y) + alpha * T^2 * mean_i soft_i``."""


class WSLDLoss(_SoftLabelLoss):
    """Weighted soft label distillation: ``CE(s, y) + alpha * T^2 * mean_i w_i * soft_i``.

    ``w_i = 1 - exp(-CE_s,i / (CE_t,i + 1e-7))`` from the un-softened, un-smoothed
    cross-entropies: near 0 where the student already beats the teacher on the true class (the
    soft label would only add variance), near 1 where it lags. The weight carries no gradient.
    """

    def sample_weights(self, log_probs_s: Tensor, fc_t: Tensor, label: Tensor) -> Tensor:
        with torch.no_grad():
            ce_s = hard_cross_entropy(log_probs_s.detach(), label)
            ce_t = hard_cross_entropy(stable_log_softmax(fc_t), label)
            ratio = (ce_s / (ce_t + WEIGHT_EPSILON)).clamp_min(0.0)
            return -torch.expm1(-ratio)  # 1 - exp(-ratio), without cancellation for small ratios


def build_loss(cfg: Any) -> nn.Module:
    smoothing = cfg.optim.smooth_alpha if cfg.optim.label_smooth else 0.0
    return _build_loss(cfg.distill.method, cfg.distill.temperature, cfg.distill.alpha,
                       cfg.model.num_classes, smoothing)


def _build_loss(method: str, temperature: float = 2.0, alpha: float = 2.5, num_classes: int = 1000,
               label_smoothing: float = 0.0) -> nn.Module:
    """The loss for ``cfg.distill.method``: 'wsld' | 'kd' | 'none' (plain cross-entropy)."""
    require_choice("distill.method", method, LOSS_METHODS)
    if method == "none":
        return CrossEntropyLoss(num_classes, label_smoothing)
    soft_label_loss = WSLDLoss if method == "wsld" else KDLoss
    return soft_label_loss(temperature, alpha, num_classes, label_smoothing)


def freeze(net: nn.Module) -> nn.Module:
    """Put net in eval mode with gradients off, in place; returns it."""
    net.eval()
    net.requires_grad_(False)
    return net


class WSLDistiller(nn.Module):
    """A trainable student, a frozen teacher and the loss between them.

    ``forward(x, label)`` returns ``(student logits, loss)``. The teacher is held outside the
    registered submodules: ``parameters()``, ``state_dict()``, ``train()`` and DDP see only the
    student (and the loss), so the teacher never reaches the optimizer or DDP's gradient
    buckets, its BatchNorm statistics never move, and checkpoints do not store it again.
    ``.to()``/``.cuda()``/``.half()`` still move it, through ``_apply``.
    """

    def __init__(self, t_net: nn.Module | None, s_net: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        if getattr(loss, "needs_teacher", True) and t_net is None:
            raise ValueError(f"{type(loss).__name__} needs a teacher, but none was given")
        self.student = s_net
        self.loss = loss
        # A plain attribute, bypassing nn.Module's registration (see the class docstring).
        object.__setattr__(self, "_teacher", None if t_net is None else freeze(t_net))

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> WSLDistiller:
        super()._apply(fn, recurse)
        if recurse and self._teacher is not None:
            self._teacher._apply(fn)
        return self

    def teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's float32 logits, without gradient, in the caller's autocast precision."""
        if self._teacher is None:
            raise RuntimeError("this distiller has no teacher")
        if self._teacher.training:  # someone called .train() on the teacher itself
            self._teacher.eval()
        with torch.no_grad():
            return self._teacher(x).float()

    def forward(self, x: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        fc_t = self.teacher_logits(x) if self.loss.needs_teacher else None
        fc_s = self.student(x)
        return fc_s, self.loss(fc_s, fc_t, label), {}

    def set_epoch(self, epoch: int) -> None:
        pass

    def extra_repr(self) -> str:
        teacher = "None" if self._teacher is None else type(self._teacher).__name__
        return f"teacher={teacher} (frozen, not registered)"
