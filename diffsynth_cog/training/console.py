"""What a training run shows while it runs.

On a terminal: one bar over the run's optimizer steps (``train 120/1000 ... train/loss=0.412``), not
Lightning's per-epoch bar, which shows the data module's one endless epoch as "Epoch 0/-2". Elsewhere (output
redirected to a file, a cluster job) or with the bar turned off: a log line every ``log_every_n_steps``
optimizer steps and at the last one (``step 120/1000  loss 0.4121  lr 1e-05  0.84 steps/s  eta 0:17:27``).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

logger = logging.getLogger(__name__)


def console_is_terminal() -> bool:
    """Whether a progress bar can be drawn: Lightning's tqdm bar draws on stdout."""
    return sys.stdout.isatty()


def _scalar(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting the run's optimizer steps (a resumed run starts where it stopped)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = trainer.global_step
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and step != bar.n:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the CSV log's version number, not a training quantity
        return metrics


class StepLog(Callback):
    """Rank 0 logs the step, loss, learning rate, speed and time left every ``every_n_steps`` optimizer steps and
    at the last one."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self._start_time = 0.0
        self._start_step = 0
        self._last = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_time, self._start_step, self._last = time.monotonic(), trainer.global_step, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step == self._last or (step % self.every_n_steps and step != total):
            return  # a micro-batch of an accumulation, or between the intervals
        self._last = step
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        loss, lr = _scalar(metrics.get("train/loss")), _scalar(metrics.get("train/lr"))
        elapsed = time.monotonic() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        eta = datetime.timedelta(seconds=round((total - step) / rate)) if rate > 0 and total > 0 else "?"
        logger.info(
            "step %d/%d  loss %s  lr %s  %.2f steps/s  eta %s",
            step,
            total,
            f"{loss:.4f}" if loss is not None else "-",
            f"{lr:.3g}" if lr is not None else "-",
            rate,
            eta,
        )


def console_callbacks(log_every_n_steps: int, progress: bool) -> tuple[list[Callback], bool]:
    """The callbacks that show progress, and whether Lightning's progress bar is on: a step bar on a terminal
    (``progress``), log lines otherwise."""
    if progress and console_is_terminal():
        return [StepProgressBar()], True
    return [StepLog(log_every_n_steps)], False
