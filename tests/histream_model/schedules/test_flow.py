"""Shifted flow-matching schedule and counter-based noise."""

from __future__ import annotations

import pytest
import torch

from histream_model.schedules.flow import FlowSchedule, chunk_noise, noise_seed


def test_warped_self_forcing_steps():
    # REFERENCE 2: [1000, 750, 500, 250] with shift 5 -> about [1000, 937.5, 833.3, 625.0]
    warped = FlowSchedule(shift=5.0).warp([1000, 750, 500, 250])
    assert warped == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0])
    # HiStream's inference shift 7 pushes the same steps to higher noise
    assert FlowSchedule(shift=7.0).warp([500])[0] == pytest.approx(875.0)
    assert FlowSchedule(shift=1.0).warp([250]) == (250.0,)


def test_x0_from_flow_inverts_the_forward_process():
    schedule = FlowSchedule(shift=5.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    t = 833.3
    x_t = schedule.renoise(x0, eps, t)
    sigma = t / 1000
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(schedule.x0_from_flow(x_t, eps - x0, t), x0)


def test_noise_is_a_function_of_seed_chunk_and_draw():
    a = chunk_noise(7, 2, 1, (3, 5))
    assert torch.equal(a, chunk_noise(7, 2, 1, (3, 5)))
    for other in (
        chunk_noise(8, 2, 1, (3, 5)),
        chunk_noise(7, 3, 1, (3, 5)),
        chunk_noise(7, 2, 0, (3, 5)),
    ):
        assert not torch.equal(a, other)
    assert len({noise_seed(s, c, d) for s in range(4) for c in range(8) for d in range(5)}) == 160
    assert 0 <= noise_seed(2**70, 1, 1) < 2**63


def test_bad_schedule_values_are_named():
    with pytest.raises(ValueError, match="shift=0"):
        FlowSchedule(shift=0)
    with pytest.raises(ValueError, match="timestep 1200"):
        FlowSchedule(shift=5.0).warp([1200])
