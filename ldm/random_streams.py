"""The random streams of training batches: each a pure function of the seed, the batch's position in the run and
the rank, so that a resumed run draws what an uninterrupted one would have."""
import torch


class BatchPositions:
    """The position of each training batch in a run: its optimizer step times the batches per step, plus its index
    among that step's batches. Under gradient accumulation several batches share a step and each needs its own
    noise; a resumed run restarts at a step boundary, where the index starts again from 0."""

    def __init__(self):
        self._step, self._index = -1, 0

    def next(self, step: int, batches_per_step: int) -> int:
        """The position of the training batch now starting (call once per batch)."""
        self._index = self._index + 1 if step == self._step else 0
        self._step = step
        return step * batches_per_step + self._index


def batches_per_step(module) -> int:
    """The trainer's `accumulate_grad_batches`, 1 for a module used without a trainer."""
    return module._trainer.accumulate_grad_batches if module._trainer is not None else 1


def step_generator(seed: int, step: int, device, rank: int = 0) -> torch.Generator:
    """The random stream of one training batch: a pure function of (seed, its position, rank), so resumed runs
    draw exactly what an uninterrupted run would have drawn."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 101 + rank) % (2**63))
    return generator
