"""The loop every toy training shares (`Phase`: resume, LR schedule, optimiser step, progress lines,
checkpoints) and its pieces. EMA: the heads trainer's `ema_update`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..io.state import load_state, save_state
from ..train.lr_schedule import warmup_cosine


def conv_autocast(device: torch.device | str = "cpu"):
    """bf16 autocast for the convolutional models (VAE, oracle): ~1.7× faster on this CPU (AMX);
    the FLUX transformer's small matmuls run faster in float32 and are left alone."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


class Checkpoint:
    """One resumable training state per phase: work/<phase>.state.safetensors (see io.state: no pickle)."""

    def __init__(self, work: Path, phase: str):
        self.path = Path(work) / f"{phase}.state.safetensors"

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None before the first save; ValueError if the file is not a state file."""
        return load_state(self.path) if self.path.is_file() else None

    def save(self, state: dict[str, Any]) -> None:
        save_state(self.path, state)

    def resume(self, parts: dict[str, Any]) -> int:
        """Restore each part (module or optimizer) from the saved state; the step to resume at (0: fresh)."""
        state = self.load()
        if state is None:
            return 0
        for key, obj in parts.items():
            obj.load_state_dict(state[key])
        return int(state["step"])

    def restore(self, model: torch.nn.Module) -> None:
        """The phase's trained "model" into `model`, frozen (eval); FileNotFoundError before the phase has run."""
        state = self.load()
        if state is None:
            phase = self.path.name.split(".")[0]
            raise FileNotFoundError(f"no trained {phase} in {self.path.parent}: run the {phase} phase first")
        model.load_state_dict(state["model"])
        model.eval().requires_grad_(False)

    def maybe_save(self, step: int, total: int, parts: dict[str, Any], every: int = 250) -> None:
        """Save after `step` (0-based) every `every` steps and at the end."""
        if (step + 1) % every == 0 or step + 1 == total:
            self.save({**{k: v.state_dict() for k, v in parts.items()}, "step": step + 1})


class Progress:
    """Plain progress lines (they suit logs and terminals alike): step, loss, speed, ETA."""

    def __init__(self, phase: str, total: int, start: int = 0, every: int = 50):
        self.phase, self.total, self.every = phase, total, every
        self.t0, self.s0 = time.time(), start
        self.loss = None

    def update(self, step: int, loss: float) -> None:
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        done = step + 1
        if done % self.every and done != self.total:
            return
        rate = (done - self.s0) / max(1e-9, time.time() - self.t0)
        eta = (self.total - done) / max(rate, 1e-9)
        print(f"[{self.phase}] step {done}/{self.total} loss {self.loss:.4f} {rate:.2f} it/s eta {eta / 60:.1f} min",
              file=sys.stderr, flush=True)


class Phase:
    """One resumable training phase: its parts (modules and the optimiser under "opt") restored from
    work/NAME.state.safetensors, a linear warm-up then cosine learning rate, one optimiser step per
    iteration, progress lines, and a checkpoint every `every` steps and at the end.

        phase = Phase(work, "vae", {"model": vae, "opt": opt}, steps, lr=1e-3, warmup=100)
        gen = torch.Generator().manual_seed(seed + phase.start)  # the data order resumes with the step
        for step in phase:
            loss = ...
            phase.step(loss, clip=vae.parameters())  # zero_grad, backward, clip to norm 1, optimiser step

    Whatever the body does after `phase.step` (an EMA update) is in the checkpoint taken after it.
    """

    def __init__(self, work: Path, name: str, parts: dict[str, Any], steps: int, *, lr: float, warmup: int,
                 every: int = 250):
        self.checkpoint, self.every = Checkpoint(work, name), every
        self.parts, self.opt, self.total, self.lr, self.warmup = parts, parts["opt"], steps, lr, warmup
        self.start = self.checkpoint.resume(parts)
        self.progress = Progress(name, steps, self.start)
        self._shown: float | None = None

    def __iter__(self):
        for step in range(self.start, self.total):
            for g in self.opt.param_groups:
                g["lr"] = self.lr * warmup_cosine(step, self.total, self.warmup)
            self._shown = None
            yield step
            if self._shown is None:
                raise RuntimeError("a Phase iteration must call phase.step(loss)")
            self.progress.update(step, self._shown)
            self.checkpoint.maybe_save(step, self.total, self.parts, self.every)

    def step(self, loss: torch.Tensor, *, clip=None, shown: torch.Tensor | None = None) -> None:
        """Backpropagate `loss` and step the optimiser (gradients clipped to norm 1 over `clip` if given);
        the progress line shows `shown` (default: the loss)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        self.opt.step()
        self._shown = float((loss if shown is None else shown).detach())

