"""SWAD: dense stochastic weight averaging over the loss valley (Cha et al., NeurIPS 2021).

The weights are averaged over every step of a segment; at each validation the segment's
average and the source-validation cross-entropy are fed to the loss-valley rule, which picks the
segments of the final average: averaging starts when the loss stops falling (the first of
``n_converge`` segments is their minimum) and the valley ends, and training stops, when the
loss of the last ``n_tolerance`` segments stays above ``(1 + tolerance_ratio)`` times the
converged level. A port of the official ``LossValley``, quirks included.

Segments follow the official VL2V default (its ``swad_fix``): a segment is not restarted at every
validation but keeps averaging from the start of training, and is restarted only at the
validations of steps 3000, 4000, ... (``restarts_segment``).
"""
from collections import deque

from stages import tracking


SEGMENT_RESTART_AFTER, SEGMENT_RESTART_EVERY = 2500, 1000


def restarts_segment(step: int) -> bool:
    """Whether the segment restarts after the validation at ``step`` (official ``swad_fix``)."""
    return step > SEGMENT_RESTART_AFTER and step % SEGMENT_RESTART_EVERY == 0


class RunningAverage:
    """Mean of floating-point tensors of a series of state dicts; others keep the last value."""

    def __init__(self, start: dict | None = None):
        """``start`` (optional) is returned until the first ``add``, which replaces it, as
        torch's AveragedModel does with the model it wraps."""
        self.count, self.state = 0, None
        if start is not None:
            self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                          for k, v in start.items()}

    def add(self, state: dict, weight: int = 1) -> None:
        if self.state is None:
            self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                          for k, v in state.items()}
            self.count = weight
            return
        self.count += weight
        for k, v in state.items():
            if v.is_floating_point():
                self.state[k] += (v.detach().float() - self.state[k]) * (weight / self.count)
            else:
                self.state[k] = v.detach().clone()


    def state_dict(self) -> dict:
        return {"count": self.count, "state": self.state}

    @classmethod
    def from_state_dict(cls, saved: dict) -> "RunningAverage":
        average = cls()
        average.count, average.state = saved["count"], saved["state"]
        return average


class Segment:
    def __init__(self, state: dict, val_loss: float, start_step: int, end_step: int):
        self.state, self.val_loss, self.start_step, self.end_step = state, val_loss, start_step, end_step

    def to_dict(self) -> dict:
        return {"state": self.state, "val_loss": self.val_loss, "start_step": self.start_step,
                "end_step": self.end_step}


class LossValley:
    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.converge_q, self.smooth_q = deque(maxlen=n_converge), deque(maxlen=n_tolerance)
        self.final = None            # RunningAverage of the chosen segments
        self.converge_step = None
        self.threshold = None
        self.dead_valley = False
        self.segments_used = []      # (start_step, end_step) of every averaged segment

    def state_dict(self) -> dict:
        """Everything needed to continue after a restart (tensors, lists and numbers only)."""
        segments = {id(seg): seg for seg in [*self.converge_q, *self.smooth_q]}
        return {"segments": [seg.to_dict() for seg in segments.values()],
                "converge_q": [list(segments).index(id(seg)) for seg in self.converge_q],
                "smooth_q": [list(segments).index(id(seg)) for seg in self.smooth_q],
                "final": None if self.final is None else self.final.state_dict(),
                "converge_step": self.converge_step, "threshold": self.threshold,
                "dead_valley": self.dead_valley, "segments_used": [list(s) for s in self.segments_used]}

    def load_state_dict(self, saved: dict) -> None:
        segments = [Segment(**seg) for seg in saved["segments"]]
        self.converge_q = deque((segments[i] for i in saved["converge_q"]), maxlen=self.n_converge)
        self.smooth_q = deque((segments[i] for i in saved["smooth_q"]), maxlen=self.n_tolerance)
        self.final = None if saved["final"] is None else RunningAverage.from_state_dict(saved["final"])
        self.converge_step, self.threshold = saved["converge_step"], saved["threshold"]
        self.dead_valley = saved["dead_valley"]
        self.segments_used = [tuple(s) for s in saved["segments_used"]]

    @property
    def converged(self) -> bool:
        return self.converge_step is not None

    def _add(self, segment: Segment) -> None:
        if self.final.count == 0:  # the first add replaces the converge segment it started from
            self.segments_used = []
        self.final.add(segment.state)
        self.segments_used.append((segment.start_step, segment.end_step))

    def _smooth_loss(self, start: int) -> float:
        return min(s.val_loss for s in list(self.smooth_q)[start:])

    def update(self, segment: Segment) -> None:
        """Feed one finished segment (its averaged weights and validation loss)."""
        if self.dead_valley:
            return
        self.converge_q.append(segment)
        self.smooth_q.append(segment)
        if not self.converged:
            if len(self.converge_q) < self.n_converge:
                return
            losses = [s.val_loss for s in self.converge_q]
            if min(range(len(losses)), key=losses.__getitem__) != 0:
                return
            self.converge_step = self.converge_q[0].end_step
            self.final = RunningAverage(start=self.converge_q[0].state)
            self.segments_used = [(self.converge_q[0].start_step, self.converge_q[0].end_step)]
            self.threshold = sum(losses) / len(losses) * (1 + self.tolerance_ratio)  # a cross-entropy: > 0
            if self.n_tolerance < self.n_converge:
                for s in list(self.converge_q)[1:1 + self.n_converge - self.n_tolerance]:
                    self._add(s)
            elif self.n_tolerance > self.n_converge:
                queue = list(self.smooth_q)[:self.n_tolerance - self.n_converge + 1]
                start = 0
                for i in reversed(range(len(queue))):
                    if queue[i].val_loss > self.threshold:
                        start = i + 1
                        break
                for s in queue[start + 1:]:
                    self._add(s)
            return
        if self.smooth_q[0].end_step < self.converge_step:
            return
        if self._smooth_loss(0) > self.threshold:
            self.dead_valley = True
            return
        self._add(self.smooth_q[0])

    def final_state(self) -> dict | None:
        """The averaged weights; the last segment's if the loss never converged."""
        if not self.converged:
            return self.converge_q[-1].state if self.converge_q else None
        if not self.dead_valley:
            self.smooth_q.popleft()
            while self.smooth_q and self._smooth_loss(0) <= self.threshold:
                self._add(self.smooth_q.popleft())
        return self.final.state



class SwadTracker:
    """SWAD's bookkeeping during training: the running segment, the loss valley fed at each
    validation, and what a resume must restore. The training loop only calls ``add`` after each
    update, ``validated`` after each validation (True: the valley ended, stop) and ``final_state``."""

    def __init__(self, **valley):
        self.valley = LossValley(**valley)
        self.segment, self.segment_start = RunningAverage(), 1

    def add(self, state: dict) -> None:
        self.segment.add(state)

    def validated(self, step: int, val_loss: float, track: tracking.Tracker = tracking.OFF) -> bool:
        frozen = {k: v.clone() for k, v in self.segment.state.items()}  # the segment may keep growing
        valley, was_converged = self.valley, self.valley.converged
        valley.update(Segment(frozen, val_loss, self.segment_start, step))
        restarts = restarts_segment(step) and not valley.dead_valley
        track.event("swad/segment", f"steps {self.segment_start}-{step}, validation loss {val_loss:.4f}"
                                    + (f"; a new segment starts at step {step + 1}" if restarts else ""), step)
        if valley.converged and not was_converged:
            track.event("swad/valley", f"the loss valley starts at step {valley.converge_step} "
                                       f"(its end: validation loss above {valley.threshold:.4f})", step)
        if valley.converged:
            track.scalar("swad/averaged_segments", len(valley.segments_used), step)
        if valley.dead_valley:
            track.event("swad/valley", f"the loss valley ends: validation loss above {valley.threshold:.4f} "
                                       f"in each of the last {valley.n_tolerance} segments; training stops", step)
            return True  # the official trainer stops when the loss valley ends
        if restarts:
            self.segment, self.segment_start = RunningAverage(), step + 1
        return False

    def final_state(self) -> dict:
        return self.valley.final_state()

    def summary(self, source_val_acc: float, last_step: int) -> dict:
        """For the training log: the averaged model's source-validation accuracy and where it came from."""
        return {"swad_converged": self.valley.converged, "swad_segments": self.valley.segments_used,
                "swad_source_val_acc": source_val_acc,
                "swad_stopped_at": last_step if self.valley.dead_valley else None}

    def state_dict(self) -> dict:
        return {"valley": self.valley.state_dict(), "segment": self.segment.state_dict(),
                "segment_start": self.segment_start}

    def load_state_dict(self, saved: dict) -> None:
        self.valley.load_state_dict(saved["valley"])
        self.segment, self.segment_start = RunningAverage.from_state_dict(saved["segment"]), saved["segment_start"]
