"""The losses against the paper's equation, and the frozen-teacher wrapper."""

from __future__ import annotations

import copy
from decimal import Decimal, localcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imagenet_train_cfg import cfg as default_cfg
from knowledge_distiller import (
    CrossEntropyLoss,
    DISTLoss,
    DKDLoss,
    KDLoss,
    WSLDistiller,
    WSLDLoss,
    build_loss,
    stable_log_softmax,
)
from utils.config import AttrDict, apply_mapping
from utils.errors import ConfigError

NUM_CLASSES = 10


# Tensors this small run faster on one thread than on OpenMP workers woken on a busy machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# The reference: the paper's equation evaluated per sample in 50-digit decimal arithmetic, so that
# it stays exact where float64 would itself round (a loss of 1e-13 next to 1).

DIGITS = 50


def _log_softmax(row: list[Decimal]) -> list[Decimal]:
    top = max(row)
    log_z = sum((v - top).exp() for v in row).ln()
    return [v - top - log_z for v in row]


def _decimal_rows(x: torch.Tensor) -> list[list[Decimal]]:
    return [[Decimal(v) for v in row] for row in x.double().tolist()]  # exact: float -> Decimal


def reference(s, t, label, temperature, alpha, smoothing=0.0, weighted=True):
    """(loss, d loss / d s) of ``CE(s, y) + alpha T^2 mean_i w_i soft_i`` (w_i = 1 without weighting)."""
    with localcontext() as ctx:
        ctx.prec = DIGITS
        n, c = s.shape
        temp, alpha, eps = Decimal(temperature), Decimal(alpha), Decimal(smoothing)
        total, grads = Decimal(0), []
        for s_row, t_row, y in zip(_decimal_rows(s), _decimal_rows(t), label.tolist()):
            target = [(1 - eps) * (k == y) + eps / c for k in range(c)]
            log_q = _log_softmax(s_row)
            log_q_soft = _log_softmax([v / temp for v in s_row])
            p_soft = [v.exp() for v in _log_softmax([v / temp for v in t_row])]
            hard = -sum(a * b for a, b in zip(target, log_q))
            soft = -sum(a * b for a, b in zip(p_soft, log_q_soft))
            weight = Decimal(1)
            if weighted:
                ce_s, ce_t = -log_q[y], -_log_softmax(t_row)[y]
                weight = 1 - (-max(ce_s / (ce_t + Decimal("1e-7")), Decimal(0))).exp()
            total += hard + alpha * temp ** 2 * weight * soft
            grads.append([(q.exp() - tk) + alpha * temp * weight * (qs.exp() - ps)
                          for q, tk, qs, ps in zip(log_q, target, log_q_soft, p_soft)])
        loss = torch.tensor(float(total / n), dtype=torch.float64)
        grad = torch.tensor([[float(g / n) for g in row] for row in grads], dtype=torch.float64)
    return loss, grad


def logits_cases(n: int = 32, c: int = NUM_CLASSES, seed: int = 0):
    """(name, student, teacher, label): random, large, and certain networks."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, c, (n,), generator=g)
    rows = torch.arange(n)

    def uniform(scale):
        return (torch.rand(n, c, generator=g) * 2 - 1) * scale

    def certain(margin, right=True):
        x = torch.zeros(n, c)
        x[rows, label if right else (label + 1) % c] = margin
        return x

    return [
        ("random", uniform(3), uniform(3), label),
        ("large", uniform(100), uniform(100), label),
        ("teacher certain and right", uniform(5), certain(100), label),
        ("teacher certain, student certain and wrong", certain(100, right=False), certain(100), label),
        ("both certain and right", certain(30), certain(25), label),
        ("both near certain", certain(18), certain(20), label),  # CE ~ 1e-8: float32's blind spot
        ("student beats teacher", certain(12), uniform(1), label),
        ("identical", uniform(8), None, label),
    ]


CASES = logits_cases()
CASE_IDS = [case[0] for case in CASES]


def case_tensors(case):
    _, s, t, label = case
    return s.clone(), (s.clone() if t is None else t.clone()), label


# ---------------------------------------------------------------------------------------------
# The losses


def assert_matches(loss, grad, expected_loss, expected_grad, temperature, alpha):
    """Equal to float32 rounding: 1e-5 relative on the loss; on the gradient, 1e-5 relative or
    1e-6 of its largest possible entry, ``(1 + alpha T) / N``, since each entry is a difference of
    probabilities (``q - target``), known in float32 to about 1e-7 absolute however small it is.
    """
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
    bound = (1 + alpha * temperature) / grad.shape[0]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6 * bound)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("temperature", "alpha", "smoothing"), [(2.0, 2.5, 0.0), (1.0, 1.0, 0.1), (4.0, 0.5, 0.0)])
def test_wsld_value_and_gradient_equal_the_papers_equation(case, temperature, alpha, smoothing):
    s, t, label = case_tensors(case)
    s.requires_grad_(True)
    loss = WSLDLoss(temperature, alpha, NUM_CLASSES, smoothing)(s, t, label)
    loss.backward()
    assert_matches(loss, s.grad, *reference(s.detach(), t, label, temperature, alpha, smoothing), temperature, alpha)


@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_kd_equals_hintons_loss_and_bounds_wsld(case):
    s, t, label = case_tensors(case)
    s.requires_grad_(True)
    kd = KDLoss(2.0, 2.5, NUM_CLASSES, 0.1)(s, t, label)
    kd.backward()
    assert_matches(kd, s.grad, *reference(s.detach(), t, label, 2.0, 2.5, 0.1, weighted=False), 2.0, 2.5)
    # The WSLD weights lie in [0, 1]: WSLD never exceeds KD.
    assert WSLDLoss(2.0, 2.5, NUM_CLASSES, 0.1)(s, t, label) <= kd


def test_wsld_weight_follows_who_is_better():
    label = torch.tensor([0, 0])
    teacher = torch.tensor([[6.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    student = torch.tensor([[12.0, 0.0, 0.0], [-4.0, 0.0, 4.0]])  # beats the teacher; lags it
    loss = WSLDLoss(2.0, 1.0, num_classes=3)
    log_probs = stable_log_softmax(student)
    weights = loss.sample_weights(log_probs, teacher, label)
    assert weights[0] < 0.01 and weights[1] > 0.999
    # Hand-computed from the definition for the first sample.
    ce_s = -torch.log_softmax(student.double(), 1)[0, 0]
    ce_t = -torch.log_softmax(teacher.double(), 1)[0, 0]
    assert weights[0].item() == pytest.approx(1 - torch.exp(-ce_s / (ce_t + 1e-7)).item(), rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch_and_ignores_the_teacher(smoothing):
    _, s, _, label = CASES[0]
    loss = CrossEntropyLoss(NUM_CLASSES, smoothing)
    assert loss.needs_teacher is False
    expected = F.cross_entropy(s, label, label_smoothing=smoothing)
    torch.testing.assert_close(loss(s, None, label), expected, rtol=1e-6, atol=0)


def test_stable_log_softmax_keeps_tiny_probabilities_of_the_top_class():
    x = torch.tensor([[30.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    with localcontext() as ctx:
        ctx.prec = DIGITS
        expected = torch.tensor([[float(v) for v in _log_softmax(row)] for row in _decimal_rows(x)],
                                dtype=torch.float64)
    torch.testing.assert_close(stable_log_softmax(x).double(), expected, rtol=1e-6, atol=0)
    assert stable_log_softmax(x)[0, 0] < 0  # torch.log_softmax rounds this -1.9e-13 to 0


def test_loss_is_float32_from_low_precision_logits_under_autocast():
    s, t, label = case_tensors(CASES[0])
    s16, t16 = s.bfloat16(), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = WSLDLoss(2.0, 2.5, NUM_CLASSES)(s16, t16, label)
    assert loss.dtype == torch.float32
    expected, _ = reference(s16.float(), t16.float(), label, 2.0, 2.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def config(method: str = "wsld", **overrides: object) -> AttrDict:
    """The default configuration with NUM_CLASSES classes, the method and dotted-key overrides
    (written with '__' for '.')."""
    mapping = {"model.num_classes": NUM_CLASSES, "distill.method": method}
    mapping.update({key.replace("__", "."): value for key, value in overrides.items()})
    return apply_mapping(copy.deepcopy(default_cfg), mapping)


def test_build_loss_gives_each_method_with_its_settings():
    kinds = {"wsld": WSLDLoss, "kd": KDLoss, "dkd": DKDLoss, "dist": DISTLoss,
             "none": CrossEntropyLoss}
    for method, kind in kinds.items():
        assert type(build_loss(config(method))) is kind
        assert build_loss(config(method)).needs_teacher == (method != "none")
    wsld = build_loss(config("wsld", distill__temperature=3.0, distill__alpha=1.5,
                             optim__label_smooth=True, distill__ce_weight=0.5))
    assert (wsld.temperature, wsld.alpha, wsld.num_classes, wsld.label_smoothing,
            wsld.ce_weight) == (3.0, 1.5, NUM_CLASSES, 0.1, 0.5)
    dkd = build_loss(config("dkd", distill__dkd__beta=2.0, distill__logit_standardization=True))
    assert (dkd.dkd_alpha, dkd.dkd_beta, dkd.warmup_epochs, dkd.standardize) == (1.0, 2.0, 1.0, True)
    dist = build_loss(config("dist", distill__dist__gamma=3.0))
    assert (dist.beta, dist.gamma) == (1.0, 3.0)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"distill__method": "crd"}, "distill.method must be one of wsld, kd, dkd, dist, none"),
    ({"distill__teacher_bn": "train"}, "distill.teacher_bn must be one of running, batch"),
    ({"distill__temperature": 0}, "distill.temperature must be a positive number"),
    ({"distill__alpha": -1}, "distill.alpha must be a non-negative number"),
    ({"distill__ce_weight": "1"}, "distill.ce_weight must be a non-negative number"),
    ({"distill__dkd__beta": float("nan")}, "distill.dkd.beta must be"),
    ({"distill__dkd__warmup_epochs": -1}, "distill.dkd.warmup_epochs must be"),
    ({"distill__dist__gamma": True}, "distill.dist.gamma must be"),
    ({"distill__logit_standardization": 1}, "must be True or False"),
    ({"distill__method": "dist", "distill__logit_standardization": True}, "not dist; set it"),
])
def test_every_distill_value_is_checked_by_build_loss(overrides, message):
    method = overrides.pop("distill__method", "kd")
    with pytest.raises(ConfigError, match=message) as error:
        build_loss(config(method, **overrides))  # method knobs are checked whatever the method
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"alpha": -1.0}, {"label_smoothing": 1.0},
                                    {"num_classes": 0}])
def test_bad_loss_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        WSLDLoss(**kwargs)


def test_logits_of_the_wrong_width_are_refused():
    s, t, label = case_tensors(CASES[0])
    with pytest.raises(ValueError, match="num_classes"):
        WSLDLoss(num_classes=1000)(s, t, label)
    with pytest.raises(ValueError, match="teacher logits"):
        WSLDLoss(num_classes=NUM_CLASSES)(s, t[:, :5], label)


# ---------------------------------------------------------------------------------------------
# The distiller


def small_net(seed: int, num_classes: int = NUM_CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def make_distiller(method: str = "wsld", teacher_bn: str = "running") -> WSLDistiller:
    return WSLDistiller(small_net(0), small_net(1), build_loss(config(method)), teacher_bn)


def train_steps(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(steps):
        x, label = batch(seed=step)
        _, loss, _ = model(x, label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_forward_returns_student_logits_and_the_loss():
    distiller = make_distiller()
    x, label = batch()
    fc_s, loss, _ = distiller(x, label)
    torch.testing.assert_close(fc_s, distiller.student(x))
    with torch.no_grad():
        expected = distiller.loss(distiller.student(x), distiller.teacher(x), label)
    torch.testing.assert_close(loss, expected)
    assert loss.requires_grad and loss.dim() == 0


def test_teacher_is_outside_parameters_state_dict_and_train_mode():
    distiller = make_distiller()
    teacher_params = {id(p) for p in distiller.teacher.parameters()}
    assert teacher_params.isdisjoint(id(p) for p in distiller.parameters())
    assert {id(p) for p in distiller.parameters()} == {id(p) for p in distiller.student.parameters()}
    assert all(key.startswith("student.") for key in distiller.state_dict())
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    distiller.train()
    assert distiller.student.training and not distiller.teacher.training
    assert not any(m.training for m in distiller.teacher.modules())
    distiller.eval()
    assert not distiller.student.training and not distiller.teacher.training


def test_to_moves_the_teacher_with_the_student():
    distiller = make_distiller().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in distiller.teacher.parameters())
    assert all(b.dtype == torch.float64 for b in distiller.teacher.buffers() if b.is_floating_point())
    x, label = batch()
    fc_s, loss, _ = distiller(x.double(), label)
    assert fc_s.dtype == torch.float64 and torch.isfinite(loss)


def test_training_changes_the_student_and_never_the_teacher():
    distiller = make_distiller()
    teacher_before = copy.deepcopy(distiller.teacher.state_dict())
    student_before = copy.deepcopy(distiller.student.state_dict())
    distiller.teacher.train()  # even a teacher switched to train mode by hand stays frozen
    train_steps(distiller)
    for key, value in distiller.teacher.state_dict().items():  # parameters and BatchNorm buffers
        assert torch.equal(value, teacher_before[key]), key
    assert all(p.grad is None for p in distiller.teacher.parameters())
    changed = [k for k, v in distiller.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert "1.running_mean" in changed and "5.weight" in changed


def test_plain_cross_entropy_never_runs_the_teacher():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher ran")

    distiller = WSLDistiller(Exploding(), small_net(1), build_loss(config("none")))
    train_steps(distiller, steps=1)
    WSLDistiller(None, small_net(1), build_loss(config("none")))(*batch())
    with pytest.raises(ValueError, match="needs a teacher"):
        WSLDistiller(None, small_net(1), build_loss(config("wsld")))


def test_ddp_sees_only_the_student(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distiller = make_distiller()
        teacher_before = copy.deepcopy(distiller.teacher.state_dict())
        ddp = DistributedDataParallel(distiller)
        assert {id(p) for p in ddp.parameters()} == {id(p) for p in distiller.student.parameters()}
        train_steps(ddp, steps=2)
        for key, value in distiller.teacher.state_dict().items():
            assert torch.equal(value, teacher_before[key]), key
    finally:
        dist.destroy_process_group()
