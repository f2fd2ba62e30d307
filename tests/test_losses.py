"""The loss of Eq. 7 and the active-area schedule."""

import pytest
import torch
import torch.nn.functional as F

from aim_ext.losses import AreaSchedule, active_area, aim_loss, area_loss, area_target
from aim_ext.models import AIMOutput


def test_area_schedule_holds_then_falls_linearly_then_holds():
    schedule = AreaSchedule(final=0.25, start=2, duration=3)
    assert [schedule(e) for e in range(8)] == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.25, 0.25])
    # The paper's recipe: 200 epochs, annealed over the first half from epoch 0: tau(0) is 1.0, it
    # falls by 0.0075 an epoch, and holds its final value from epoch 100 (the first selectable).
    paper = AreaSchedule(final=0.25, start=0, duration=100)
    assert (paper(0), paper(1), paper(99), paper(100), paper(199)) == pytest.approx(
        (1.0, 0.9925, 0.2575, 0.25, 0.25)
    )
    assert AreaSchedule(final=0.35, start=1, duration=0)(0) == 1.0
    assert AreaSchedule(final=0.35, start=1, duration=0)(1) == 0.35
    assert area_target(None, 5) is None
    with pytest.raises(ValueError, match="final tau"):
        AreaSchedule(final=1.5)


def test_per_stage_targets_anneal_each_to_its_own_value():
    schedule = AreaSchedule(final=(0.25, 0.5), start=1, duration=2)
    assert [schedule(e) for e in range(4)] == [(1.0, 1.0), (1.0, 1.0), (0.625, 0.75), (0.25, 0.5)]
    masks = [torch.ones(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, 1, 4, 4, dtype=torch.float64)]
    tau = torch.tensor([0.25, 0.5], dtype=torch.float64)
    for per_image in (True, False):
        assert area_loss(masks, tau, per_image=per_image).item() == pytest.approx(0.75**2 + 0.5**2)
    assert area_loss(masks, (0.25, 0.5)).item() == pytest.approx(0.75**2 + 0.5**2)  # area_target's tuple
    with pytest.raises(ValueError, match="3 area targets for 2 masks"):
        area_loss(masks, torch.ones(3))
    with pytest.raises(ValueError, match="final tau"):
        AreaSchedule(final=(0.3, 1.2))


def test_active_area_and_area_loss():
    masks = [torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), torch.ones(2, 1, 3, 3)]
    assert active_area(masks[0]).item() == 0.25
    assert area_loss(masks, 0.25).item() == pytest.approx(0.0 + 0.75**2)
    assert area_loss(masks, 0.25, per_image=False).item() == pytest.approx(0.0 + 0.75**2)


def test_the_area_loss_per_image_or_over_the_batch():
    """Eq. 6's r_l per image holds every image near tau; pooled, only the batch's average: two
    images, one mask all on and one all off, average exactly tau = 0.5."""
    masks = [torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)]).double()]
    assert area_loss(masks, 0.5, per_image=False).item() == 0.0
    assert area_loss(masks, 0.5).item() == pytest.approx(0.25)  # mean of (1 - .5)^2 and (0 - .5)^2
    # Random masks against a float64 loop over the images, and the gradient reaches every mask.
    g = torch.Generator().manual_seed(0)
    masks = [
        (torch.rand(5, 1, h, w, generator=g, dtype=torch.float64) > 0.6).double().requires_grad_()
        for h, w in [(2, 3), (4, 4)]
    ]
    expected = sum(sum((float(m[n].mean()) - 0.3) ** 2 for n in range(5)) / 5 for m in masks)
    loss = area_loss(masks, 0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    for m in masks:  # d/dm of mean_n (r_n - tau)^2 = 2 (r_n - tau) / (N h w)
        r = m.detach().flatten(1).mean(1)
        expected_grad = (2 * (r - 0.3) / (5 * m[0].numel())).view(5, 1, 1, 1).expand_as(m)
        torch.testing.assert_close(m.grad, expected_grad, rtol=1e-12, atol=0)
    # Data parallel: a process holding images 0-1 sums over the global batch with the process
    # holding images 2-4 (sum_over_batch adds that process's part); the loss is the whole batch's.
    for per_image in (True, False):
        mine, theirs = [m.detach()[:2] for m in masks], [m.detach()[2:] for m in masks]
        parts = [
            torch.stack([((m.flatten(1).mean(1) - 0.3) ** 2).sum(), torch.tensor(3.0, dtype=m.dtype)])
            if per_image
            else torch.stack([m.sum(), torch.tensor(float(m.numel()), dtype=m.dtype)])
            for m in theirs
        ]
        global_ = area_loss(mine, 0.3, lambda t, parts=parts: t + parts.pop(0), per_image=per_image)
        assert global_.item() == pytest.approx(area_loss(masks, 0.3, per_image=per_image).item(), rel=1e-12)


def test_aim_loss_is_eq7():
    logits, aux = torch.randn(4, 3), [torch.randn(4, 3), torch.randn(4, 3)]
    masks = [torch.ones(4, 1, 2, 2), torch.zeros(4, 1, 4, 4)]
    target = torch.tensor([0, 2, 1, 0])
    terms = aim_loss(AIMOutput(logits, aux, masks, [m for m in masks]), target, tau=0.3, area_weight=6.0)
    ce = lambda x: F.cross_entropy(x, target, label_smoothing=0.05)  # noqa: E731
    expected_area = (1 - 0.3) ** 2 + (0 - 0.3) ** 2
    assert terms.area.item() == pytest.approx(expected_area)
    assert terms.total.item() == pytest.approx(
        (ce(logits) + ce(aux[0]) + ce(aux[1]) + 6.0 * expected_area).item()
    )
    no_annealing = aim_loss(AIMOutput(logits, aux, masks, masks), target, tau=None)
    assert no_annealing.area.item() == 0.0
    assert no_annealing.total.item() == pytest.approx((ce(logits) + ce(aux[0]) + ce(aux[1])).item())


def test_vanilla_loss_is_smoothed_cross_entropy():
    logits, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    terms = aim_loss(logits, target, tau=0.25)
    assert terms.total.item() == pytest.approx(F.cross_entropy(logits, target, label_smoothing=0.05).item())
    assert terms.aux_ce.item() == 0.0 and terms.area.item() == 0.0


def test_active_area_over_a_split_batch_is_the_global_fraction():
    full = (torch.rand(8, 1, 5, 5) > 0.7).float().requires_grad_()
    halves = [full[:4], full[4:]]
    # Stand-in for the sum over processes: both halves' counts, added (and differentiable).
    others = [torch.stack([h.sum(), torch.tensor(float(h.numel()))]) for h in halves]
    r = active_area(halves[0], lambda counts: counts + others[1].detach())
    assert r.item() == pytest.approx(active_area(full).item())
    r.backward()
    assert full.grad[:4].abs().sum() > 0


def test_no_auxiliary_losses_ablation():
    logits, aux, target = torch.randn(4, 3), [torch.randn(4, 3)], torch.tensor([0, 1, 2, 0])
    masks = [torch.ones(4, 1, 2, 2)]
    terms = aim_loss(AIMOutput(logits, aux, masks, masks), target, tau=0.5, aux_weight=0.0)
    expected = F.cross_entropy(logits, target, label_smoothing=0.05) + 6.0 * 0.25
    assert terms.total.item() == pytest.approx(expected.item())
