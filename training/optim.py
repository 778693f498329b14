"""The optimisation loop both trainers share: AdamW, a one-cycle schedule, gradient clipping."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

Progress = Callable[[int, float], None]


class Optimiser:
    """AdamW under a one-cycle learning rate (5% warm-up) with gradient-norm clipping at 1;
    `step(loss)` runs one update and records the loss."""

    def __init__(
        self, params: Iterable[nn.Parameter], lr: float, steps: int, weight_decay: float = 0.0
    ) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=lr, total_steps=steps, pct_start=0.05
        )
        self.losses: list[float] = []

    def step(self, loss: Tensor, progress: Progress | None = None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.losses.append(loss.item())
        if progress is not None:
            progress(len(self.losses) - 1, self.losses[-1])
