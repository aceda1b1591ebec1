"""Which (image, view) pairs a training step uses.

As in DomainBed, every step takes the same number of images from each source domain. Each
image comes with one of its recorded augmented views (1..K-1; view 0 is the eval view and is
used only when no augmented view was extracted).
"""
import numpy as np


class BalancedViewSampler:
    """Batches of flat items ``row * n_views + view`` for steps ``start_step..steps-1``.

    With ``world`` > 1 (torchrun) each rank yields its slice ``batch[rank::world]`` of the same
    global batch.
    """

    def __init__(self, rows_by_domain: list, per_domain: int, n_views: int, seed: int,
                 steps: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.rows_by_domain = [np.asarray(r) for r in rows_by_domain if len(r)]
        self.per_domain, self.n_views = per_domain, n_views
        self.seed, self.steps, self.start_step = seed, steps, start_step
        self.rank, self.world = rank, world
        if (per_domain * len(self.rows_by_domain)) % world:
            raise ValueError(f"the batch of {per_domain * len(self.rows_by_domain)} images does not split "
                             f"evenly over {world} processes")

    def __len__(self):
        return self.steps - self.start_step

    def batch(self, step: int) -> np.ndarray:
        """The batch of one step: the same for a given (seed, step), so runs can resume."""
        rng = np.random.default_rng([self.seed, step])
        rows = np.concatenate([
            rng.choice(r, self.per_domain, replace=len(r) < self.per_domain)
            for r in self.rows_by_domain
        ])
        if self.n_views > 1:
            chosen_views = rng.integers(1, self.n_views, size=len(rows))
        else:
            chosen_views = np.zeros(len(rows), np.int64)
        return rows * self.n_views + chosen_views

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            yield self.batch(step)[self.rank::self.world].tolist()
