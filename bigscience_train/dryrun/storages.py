"""Every tensor storage alive while a piece of code runs, its total at every operation and its peak, and the
share of named kinds (weights, gradients, ...) sampled along the way.

torch's MemTracker does the first part but follows one forward per module and step, and a training step runs
several micro-batches through each block; this follows storages only, so any schedule can run under it.
Storages come from three places: every tensor alive when tracking starts (found by the garbage collector),
every tensor an operation returns, and storages resized in place (FSDP frees and refills its gathered
parameters that way, outside the dispatcher). Under FakeTensorMode only fake tensors count: their storages are
what the real run would allocate, while meta tensors (example shapes) allocate nothing anywhere.

The kinds are sampled when the next operation is dispatched, not inside the one that allocated: an operation's
result is named by where the code stores it (FSDP's fp32 copy of a gradient becomes a gradient once assigned),
and until then it would count as an activation.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from functools import wraps

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

# How often, in operations, the kinds are sampled besides each new peak.
SAMPLE_EVERY = 64
# A new peak is sampled when it exceeds the last sampled one by this fraction: allocation rises in many
# small steps, and sampling each would cost a pass over every live storage each time.
PEAK_RESOLUTION = 0.002
OTHER = "activations"


def leaf_tensors(t: torch.Tensor) -> Iterable[torch.Tensor]:
    """The plain tensors a tensor subclass (DTensor, ...) holds its data in."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from leaf_tensors(inner)
    else:
        yield t


class StorageTracker(TorchDispatchMode):
    """`kinds()` returns, when called, {kind: tensors} of the storages to name (the first kind naming a
    storage wins); the rest are OTHER. `fake`: count only fake tensors (under FakeTensorMode)."""

    def __init__(
        self, kinds: Callable[[], dict[str, Iterable[torch.Tensor]]], fake: bool, device: str = "cpu"
    ):
        super().__init__()
        self.kinds, self.fake, self.device = kinds, fake, device
        self.live: dict[int, list] = {}  # storage key -> [weak reference, bytes, the op that made it]
        self.total = self.peak = 0
        self.peak_kinds: dict[str, int] = {}
        # What the unnamed storages at the peak are, by the operation that returned them.
        self.peak_other_ops: dict[str, int] = {}
        # ... and when they are at their largest.
        self.max_other_ops: dict[str, int] = {}
        self.max_kinds: Counter = Counter()
        self._sampled_peak = 0
        self._ops = 0
        # A new peak whose kinds are sampled at the next operation.
        self._peak_pending = False
        self._resize = torch.UntypedStorage.resize_

    # -- which storages ------------------------------------------------------------------------------
    def _counts(self, t: torch.Tensor) -> bool:
        return isinstance(t, FakeTensor) if self.fake else t.device.type == self.device

    def storages(self, t: torch.Tensor) -> Iterable[torch.UntypedStorage]:
        for leaf in leaf_tensors(t):
            if self._counts(leaf):
                yield leaf.untyped_storage()

    def _add(self, st: torch.UntypedStorage, origin: str = "before tracking") -> None:
        key, size = st._cdata, st.nbytes()
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [weakref.ref(st, self._freed(key)), size, origin]
            self.total += size
        elif entry[1] != size:
            self.total += size - entry[1]
            entry[1] = size

    def _freed(self, key: int) -> Callable:
        def forget(ref: weakref.ref) -> None:
            entry = self.live.get(key)
            if entry is not None and entry[0] is ref:
                self.total -= entry[1]
                del self.live[key]

        return forget

    # -- sampling ------------------------------------------------------------------------------------
    def sample(self, at_peak: bool = False) -> None:
        """The kinds as they stand now; `at_peak`: the first sample since a new peak, which they are recorded
        as (frees since the peak's operation, if any, are not in them)."""
        named: dict[int, str] = {}
        for kind, tensors in self.kinds().items():
            for t in tensors:
                for st in self.storages(t):
                    named.setdefault(st._cdata, kind)
        by_kind: Counter = Counter()
        other_ops: Counter = Counter()
        for key, (_, size, origin) in self.live.items():
            kind = named.get(key, OTHER)
            by_kind[kind] += size
            if kind == OTHER:
                other_ops[origin] += size
        if by_kind[OTHER] > self.max_kinds[OTHER]:
            self.max_other_ops = dict(other_ops.most_common(8))
        for kind, size in by_kind.items():
            self.max_kinds[kind] = max(self.max_kinds[kind], size)
        if at_peak or self.total >= self._sampled_peak:
            self._sampled_peak = self.peak if at_peak else self.total
            self.peak_kinds = dict(by_kind)
            self.peak_other_ops = dict(other_ops.most_common(8))

    def _after_allocation(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            if self.total > self._sampled_peak * (1 + PEAK_RESOLUTION):
                self._peak_pending = True

    # -- the dispatch mode ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._peak_pending or self._ops % SAMPLE_EVERY == 0:
            self.sample(at_peak=self._peak_pending)
            self._peak_pending = False
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for st in self.storages(t):
                    self._add(st, func.__name__)
        self._after_allocation()
        self._ops += 1
        return out

    def __enter__(self):
        gc.collect()
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                for st in self.storages(obj):
                    self._add(st)
        self.peak = self.total
        tracker, resize = self, self._resize

        @wraps(resize)
        def tracked_resize(st: torch.UntypedStorage, size: int):
            result = resize(st, size)
            if st._cdata in tracker.live:
                tracker._add(st)
                tracker._after_allocation()
            return result

        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        self.sample(at_peak=self._peak_pending)
        return super().__exit__(*exc)
