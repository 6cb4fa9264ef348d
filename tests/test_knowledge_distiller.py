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
    """(loss, d loss / d s) of ``CE(s, y) + alpha T^2 mean_i w_i soft_i`` (w_i = 1 without
    weighting)."""
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
        ("teacher certain, student certain and wrong", certain(100, right=False), certain(100),
         label),
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
@pytest.mark.parametrize(("temperature", "alpha", "smoothing"),
                         [(2.0, 2.5, 0.0), (1.0, 1.0, 0.1), (4.0, 0.5, 0.0)])
def test_wsld_value_and_gradient_equal_the_papers_equation(case, temperature, alpha, smoothing):
    s, t, label = case_tensors(case)
    s.requires_grad_(True)
    loss = WSLDLoss(temperature, alpha, NUM_CLASSES, smoothing)(s, t, label)
    loss.backward()
    assert_matches(loss, s.grad, *reference(s.detach(), t, label, temperature, alpha, smoothing),
                   temperature, alpha)


@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_kd_equals_hintons_loss_and_bounds_wsld(case):
    s, t, label = case_tensors(case)
    s.requires_grad_(True)
    kd = KDLoss(2.0, 2.5, NUM_CLASSES, 0.1)(s, t, label)
    kd.backward()
    expected = reference(s.detach(), t, label, 2.0, 2.5, 0.1, weighted=False)
    assert_matches(kd, s.grad, *expected, 2.0, 2.5)
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
    assert (dkd.dkd_alpha, dkd.dkd_beta, dkd.warmup_epochs) == (1.0, 2.0, 1.0) and dkd.standardize
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
    student_ids = {id(p) for p in distiller.student.parameters()}
    assert {id(p) for p in distiller.parameters()} == student_ids
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
    assert all(b.dtype == torch.float64
               for b in distiller.teacher.buffers() if b.is_floating_point())
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
    changed = [k for k, v in distiller.student.state_dict().items()
               if not torch.equal(v, student_before[k])]
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
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
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


def test_batch_teacher_bn_normalises_with_the_batch_and_changes_nothing():
    eval_copy, train_copy = small_net(0).eval(), small_net(0).train()
    distiller = make_distiller(teacher_bn="batch")
    before = copy.deepcopy(distiller.teacher.state_dict())
    x, label = batch()
    with torch.no_grad():
        expected, running = train_copy(x), eval_copy(x)
    assert not torch.allclose(expected, running)  # the two modes really differ on this batch
    torch.testing.assert_close(distiller.teacher_logits(x), expected, rtol=0, atol=0)
    train_steps(distiller)
    distiller.teacher.eval()  # as the teacher's validation leaves it: the next step undoes it
    train_steps(distiller, steps=1)
    for key, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in distiller.teacher.parameters())
    torch.testing.assert_close(distiller.teacher_logits(x), expected, rtol=0, atol=0)
    with torch.no_grad():  # the bare teacher in eval mode (validation) uses the stored statistics
        torch.testing.assert_close(distiller.teacher.eval()(x), running, rtol=0, atol=0)


def test_running_teacher_bn_is_the_eval_mode_teacher():
    distiller, eval_copy = make_distiller(), small_net(0).eval()
    x, label = batch()
    fc_s, loss, _ = distiller(x, label)
    with torch.no_grad():
        expected = distiller.loss(fc_s, eval_copy(x), label)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="teacher_bn"):
        make_distiller(teacher_bn="train")


@pytest.mark.parametrize("method", ["wsld", "kd", "dkd", "dist", "none"])
def test_batch_stats_count_regularisation_samples_and_sum_wsld_weights(method):
    distiller = make_distiller(method)
    x, label = batch(n=64)
    fc_s, _, stats = distiller(x, label)
    if method == "none":
        assert stats == {}
        return
    with torch.no_grad():
        ce_s = F.cross_entropy(fc_s.double(), label, reduction="none")
        ce_t = F.cross_entropy(distiller.teacher(x).double(), label, reduction="none")
    assert 0 < (ce_s < ce_t).sum() < len(label)  # a batch where the count says something
    assert set(stats) == ({"regularisation_samples", "weight_sum"} if method == "wsld"
                          else {"regularisation_samples"})
    assert all(v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad
               for v in stats.values())
    assert stats["regularisation_samples"].item() == (ce_s < ce_t).sum().item()
    if method == "wsld":
        expected = (1 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0))).sum()
        torch.testing.assert_close(stats["weight_sum"].double(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# The other logit-based methods, against their papers' equations transcribed here in float64,
# and DKD against its official code's arithmetic.

RANDOM_CASES = [CASES[0], (None, *logits_cases(64, NUM_CLASSES, seed=3)[0][1:])]


def assert_same_loss_and_gradient(loss_fn, reference_fn, s, t, label, value_offset=None):
    """loss_fn in float32 equals reference_fn in float64 (its value less value_offset) to float32
    rounding, in value and gradient with respect to the student's logits."""
    s32 = s.clone().requires_grad_(True)
    loss = loss_fn(s32, t, label)
    loss.backward()
    s64 = s.double().requires_grad_(True)
    expected = reference_fn(s64, t.double(), label)
    expected.backward()
    offset = 0.0 if value_offset is None else value_offset
    assert loss.dtype == torch.float32 and torch.isfinite(s32.grad).all()
    torch.testing.assert_close(loss.double(), expected.detach() + offset, rtol=1e-5, atol=1e-7)
    scale = s64.grad.abs().max()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-5 * scale)


def paper_standardize(z):
    """Sun et al.: (z - mean) / std per row, with the official 1e-7 and the unbiased std."""
    return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, keepdim=True))


def teacher_entropy(t, temperature):
    p = F.softmax(t.double() / temperature, 1)
    return -(p * p.log()).sum(1).mean()


@pytest.mark.parametrize("case", RANDOM_CASES, ids=["random", "random 64"])
def test_kd_with_logit_standardisation_is_the_official_kl_plus_the_teachers_entropy(case):
    _, s, t, label = case
    kd = build_loss(config("kd", distill__temperature=2.0, distill__alpha=9.0,
                           distill__logit_standardization=True))

    def official(s, t, label):  # CE + 9 * T^2 * KL(softmax(std(t)/T) || softmax(std(s)/T))
        log_p = F.log_softmax(paper_standardize(s) / 2.0, 1)
        q = F.softmax(paper_standardize(t) / 2.0, 1)
        return F.cross_entropy(s, label) + 9.0 * 4.0 * (q * (q.log() - log_p)).sum(1).mean()

    entropy = 9.0 * 4.0 * teacher_entropy(paper_standardize(t.double()), 2.0)
    assert entropy > 1.0  # the offset is not lost in the tolerance
    assert_same_loss_and_gradient(kd, official, s, t, label, value_offset=entropy)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=["random", "random 64"])
def test_wsld_with_logit_standardisation_keeps_raw_weights_and_hard_term(case):
    _, s, t, label = case
    wsld = build_loss(config("wsld", distill__logit_standardization=True))

    def paper(s, t, label):
        ce_s = F.cross_entropy(s, label, reduction="none").detach()
        ce_t = F.cross_entropy(t, label, reduction="none")
        w = 1 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0))
        soft = -(F.softmax(paper_standardize(t) / 2, 1)
                 * F.log_softmax(paper_standardize(s) / 2, 1)).sum(1)
        return F.cross_entropy(s, label) + 2.5 * 4 * (w * soft).mean()

    assert_same_loss_and_gradient(wsld, paper, s, t, label)


def paper_dkd(s, t, label, alpha, beta, temperature, ce_weight=1.0, warmup=1.0):
    """Zhao et al., eq. (1)-(7): binary b = (p_target, 1 - p_target) and the non-target
    distribution p_k / (1 - p_target); KL of each, times T^2."""
    def parts(z):
        p = F.softmax(z / temperature, 1)
        p_y = p.gather(1, label.unsqueeze(1))
        b = torch.cat([p_y, 1 - p_y], 1)
        other = torch.ones_like(p, dtype=torch.bool).scatter(1, label.unsqueeze(1), False)
        return b, p[other].view(len(p), -1) / (1 - p_y)

    (b_s, n_s), (b_t, n_t) = parts(s), parts(t)
    tckd = (b_t * (b_t / b_s).log()).sum(1)
    nckd = (n_t * (n_t / n_s).log()).sum(1)
    distil = warmup * temperature ** 2 * (alpha * tckd + beta * nckd).mean()
    return ce_weight * F.cross_entropy(s, label) + distil


def official_dkd_arithmetic(s, t, label, alpha, beta, temperature):
    """The official code's way: log of summed probabilities, the target masked with -1000."""
    gt = torch.zeros_like(s).scatter(1, label.unsqueeze(1), 1.0)
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    bin_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    bin_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(bin_s), bin_t, reduction="sum") * temperature ** 2 / len(s)
    log_p2 = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    p_t2 = F.softmax(t / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_p2, p_t2, reduction="sum") * temperature ** 2 / len(s)
    return F.cross_entropy(s, label) + alpha * tckd + beta * nckd


@pytest.mark.parametrize("case", RANDOM_CASES, ids=["random", "random 64"])
@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 0.5, 1.0), (1.0, 8.0, 4.0)])
def test_dkd_equals_the_papers_equation_and_the_official_arithmetic(case, alpha, beta,
                                                                     temperature):
    _, s, t, label = case
    dkd = build_loss(config("dkd", distill__alpha=1.0, distill__temperature=temperature,
                            distill__dkd__alpha=alpha, distill__dkd__beta=beta))
    assert_same_loss_and_gradient(
        dkd, lambda s, t, y: paper_dkd(s, t, y, alpha, beta, temperature), s, t, label)
    assert_same_loss_and_gradient(
        dkd, lambda s, t, y: official_dkd_arithmetic(s, t, y, alpha, beta, temperature),
        s, t, label)


def test_dkd_warms_up_by_epoch_from_one():
    _, s, t, label = CASES[0]
    dkd = build_loss(config("dkd", distill__dkd__warmup_epochs=4, distill__ce_weight=0.0))
    # distill.alpha (2.5 by default) is not DKD's: its own weights are dkd.alpha and dkd.beta.
    full = paper_dkd(s.double(), t.double(), label, 1.0, 0.5, 2.0, ce_weight=0.0)
    for epoch, factor in [(None, 0.25), (1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)]:
        if epoch is not None:  # a fresh loss is in epoch 1
            dkd.set_epoch(epoch)
        torch.testing.assert_close(dkd(s, t, label).double(), factor * full, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", CASES[1:7], ids=CASE_IDS[1:7])
def test_dkd_stays_finite_where_the_official_arithmetic_does_not(case):
    s, t, label = case_tensors(case)
    s, t = s * 100, t * 100  # logits of 1e4: float32 probabilities of exactly 0 and 1
    s.requires_grad_(True)
    loss = build_loss(config("dkd", distill__logit_standardization=False))(s, t, label)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss >= F.cross_entropy(s, label)  # both KL terms are non-negative
    official = official_dkd_arithmetic(s.detach(), t, label, 1.0, 0.5, 2.0)
    assert not torch.isfinite(official) or case[0] == "identical"


def paper_dist(s, t, beta, gamma, tau):
    """Huang et al.: 1 - mean Pearson correlation over rows (inter) and over columns (intra) of
    softmax(z / tau), times tau^2."""
    def pearson_distance(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - ((a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)).sqrt()).mean()

    y_s, y_t = F.softmax(s / tau, 1), F.softmax(t / tau, 1)
    return tau ** 2 * (beta * pearson_distance(y_s, y_t) + gamma * pearson_distance(y_s.T, y_t.T))


@pytest.mark.parametrize("case", RANDOM_CASES, ids=["random", "random 64"])
@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_equals_the_papers_equation(case, beta, gamma, tau):
    _, s, t, label = case
    dist = build_loss(config("dist", distill__alpha=2.0, distill__temperature=tau,
                             distill__dist__beta=beta, distill__dist__gamma=gamma))

    def paper(s, t, label):
        return F.cross_entropy(s, label) + 2.0 * paper_dist(s, t, beta, gamma, tau)

    assert_same_loss_and_gradient(dist, paper, s, t, label)
