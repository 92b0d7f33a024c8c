"""One object from prompts on several slices, optionally refining an earlier answer (corrections).

Two ways to use the prompts, chosen by what the engine can do:

- anchors (any engine; LiteMedSAM, and MedSAM2 with a single box): each prompted slice's box starts
  a walk up and a walk down (`propagate.walk_from_box`); a walk never crosses the next prompted slice, so between
  two anchors both walks meet, and each slice takes the mask of the nearer anchor's walk (the other's
  when the nearer one stopped before it).
- conditioned (a `PromptedVolumeEngine`: MedSAM2): every prompted slice conditions the predictor at
  once; one pass runs up from the lowest prompted slice, one down from the highest, and the slices
  both passes cover are OR-ed, as the single-box route OR-s its two directions.

With an earlier mask (`previous`), an anchor whose own slice the earlier answer already has (Dice >=
`AGREE_DICE`: a prompt of an earlier round, sent again) keeps that slice and is not walked again, and a walk past the outermost prompted slices (or, for anchors, past
its own anchor) also stops on the first slice whose new mask agrees with the earlier one (Dice >=
`AGREE_DICE`): from there on the earlier answer stands. Slices no walk reached keep the earlier mask;
prompted slices always take the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.heap import release_if_grown
from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.engines.base import PromptedVolumeEngine, SlicePrompt, VolumeEngine
from medsam2_endpoint.pipeline.propagate import (
    ADVICE,
    ObjectResult,
    PropagationOptions,
    as_logits,
    keep_largest_component,
    walk_from_box,
)
from medsam2_endpoint.pipeline.tracking import current_rule

# A corrected walk rejoins the earlier answer once the two masks on a slice overlap this much: the
# earlier answer was right from there on, so recomputing further slices could only disturb it.
AGREE_DICE = 0.9
# How many slices past its prompt a correction may overwrite where the earlier answer has foreground.
# Box-tracked masks drift from a corrected slice (a box grown from a small end slice under-segments
# the slices inward), so a correction replaces its neighbours only, and only where its mask sits at least
# as well as the earlier mask between the corrected slice and the earlier answer beyond (`_fit`): a
# box-tracked neighbour can leak, or shrink towards a small end slice, where the earlier answer was right
# (benchmarks/interactive.py: CT lesions, the MR phantom). Into slices the earlier answer left empty the
# walk goes on by the engine's rules only from a prompt on a slice the earlier answer left empty too (the
# correction moves an end); from a slice the earlier answer had, it stops there, as the earlier walk did
# for a reason (on the MR vertebra a correction of its last slice otherwise ran into the next vertebra).
OVERWRITE_REACH = 1
# A correction that moves an end walks on past its own slice at most as many slices as it lies beyond the earlier
# answer (`_reach_past`): next to the end it moves the end to its slice; further out it says the walk stopped that
# many slices short, and may go that far again. Unbounded, a box on a structure's last labelled slice walked on into
# look-alike slices (MR iliopsoas 0.437 -> 0.114, CT pancreas 0.416 -> 0.350 in nni_client.py's correction step).


@dataclass
class PromptedResult(ObjectResult):
    reached: np.ndarray | None = None  # bool (Z,): slices computed from this request's prompts


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; two empty masks agree (1.0)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass(frozen=True)
class _Walk:
    """How far one stream of engine steps may go, and where its stop rules apply."""

    bound: int  # first slice it must not yield (exclusive), in its direction
    free_until: int  # stop rules (empty run, agreement) apply only beyond this slice
    step: int  # +1 up, -1 down
    reach: int | None = None  # slices the earlier answer left empty it may fill beyond free_until (None: no limit)


def _reach_past(previous: np.ndarray | None, z: int, step: int) -> int | None:
    """How many empty slices of the earlier answer a walk from slice z going `step` may fill beyond z: the
    number of empty slices between z and the earlier answer behind it; None when nothing of it lies behind
    (a walk towards the earlier answer fills the gap up to it) or there is no earlier answer."""
    if previous is None:
        return None
    behind = range(z - step, -1 if step > 0 else previous.shape[0], -step)
    for n, b in enumerate(behind):
        if previous[b].any():
            return n
    return None


def _consume(steps: Iterator[tuple[int, np.ndarray]], walk: _Walk, options: PropagationOptions,
             previous: np.ndarray | None, check: Callable[[int], None]) -> dict[int, np.ndarray]:
    """z -> logits of one walk, honouring its bound, the options' stop rules and agreement with `previous`."""
    out: dict[int, np.ndarray] = {}
    empty_run = 0
    count = 0
    overwritten = 0
    filled = 0  # slices beyond free_until the earlier answer left empty
    last: np.ndarray | None = None  # the walk's mask on the slice before this one
    try:
        for z, step in steps:
            if (z - walk.bound) * walk.step >= 0:
                break
            logits = as_logits(step)
            foreground = logits > 0
            beyond = (z - walk.free_until) * walk.step > 0
            if beyond and previous is not None:
                if dice(foreground, previous[z]) >= AGREE_DICE:
                    break  # the earlier answer holds from here
                if previous[z].any():
                    overwritten += 1
                    if overwritten > OVERWRITE_REACH:
                        break
                    if last is not None and _fit(previous[z], last, previous, z + walk.step) > _fit(foreground, last, previous, z + walk.step):
                        break  # the earlier mask fits between the corrected slice and the earlier answer beyond better
                elif overwritten or previous[walk.free_until].any():
                    break  # past the earlier answer's end only from a prompt beyond it (the correction moves the end)
                else:
                    filled += 1
                    if walk.reach is not None and filled > walk.reach:
                        break  # as far past the prompt as the prompt lies past the earlier answer
            out[z] = logits
            last = foreground
            count += 1
            release_if_grown()
            empty_run = 0 if foreground.any() or not beyond else empty_run + 1
            if options.stop_after_empty is not None and empty_run >= options.stop_after_empty:
                break
            if options.max_slices is not None and beyond and count >= options.max_slices:
                break
            check(1)
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    return out


def _fit(candidate: np.ndarray, before: np.ndarray, previous: np.ndarray, beyond: int) -> float:
    """How well a slice's candidate mask sits between the walk's mask on the slice before it and the
    earlier answer on the slice after it (which the walk leaves as it is): its soft Dice with their mean
    (1 where both have the object, 0.5 where one has). Unlike a Dice with either side alone, this does
    not favour a mask the size of a small end slice inwards of it, nor one that leaks past both."""
    after = previous[beyond] if 0 <= beyond < previous.shape[0] else np.zeros_like(before)
    expected = (before.astype(np.float32) + after.astype(np.float32)) / 2
    total = float(candidate.sum()) + float(expected.sum())
    return 1.0 if total == 0 else 2.0 * float(expected[candidate].sum()) / total


class WalkMemo:
    """The steps an anchor's walk yielded, kept across requests (a bounded LRU of bytes).

    A correction round sends every prompt so far: the walks from the earlier anchors are the ones the
    earlier rounds ran, step for step (a walk is a function of the volume, the engine, its rule, the
    slice, the box and the direction), so they are replayed from here instead of run through the
    decoder again. A walk that goes further than its recorded steps continues on the engine (which
    recomputes the recorded prefix once, from cached features)."""

    def __init__(self, max_bytes: int) -> None:
        self._cache = ByteLRU(max_bytes)

    def track(self, engine: VolumeEngine, state: object, volume_key: str, *, key_index: int, box: np.ndarray,
              reverse: bool) -> Iterator[tuple[int, np.ndarray]]:
        """`walk_from_box(engine, state, ...)`, its steps recorded under this walk's key and replayed when recorded."""
        key = (engine.info.name, engine.info.sha256, repr(current_rule()), volume_key, key_index,
               tuple(int(v) for v in box), reverse)
        entry: _Recorded | None = self._cache.get(key)
        recorded = entry.steps if entry is not None else []
        steps, complete = list(recorded), entry is not None and entry.complete
        try:
            yield from recorded
            if complete:
                return  # the engine's walk ended there
            live = walk_from_box(engine, state, key_index=key_index, box=box, reverse=reverse)
            try:
                for k, step in enumerate(live):
                    if k >= len(recorded):
                        steps.append(step)
                        yield step
                complete = True
            finally:
                close = getattr(live, "close", None)
                if close is not None:
                    close()
        finally:
            if len(steps) > len(recorded) or (complete and entry is not None and not entry.complete):
                self._cache.put(key, _Recorded(steps, complete))


@dataclass(frozen=True)
class _Recorded:
    steps: list[tuple[int, np.ndarray]]
    complete: bool  # the engine's walk ended after these steps (a replay never needs the engine)

    @property
    def nbytes(self) -> int:
        return sum(int(logits.nbytes) for _, logits in self.steps)


def _close(steps: Iterator[tuple[int, np.ndarray]]) -> None:
    close = getattr(steps, "close", None)
    if close is not None:
        close()


def _prepend(first: tuple[int, np.ndarray] | None, steps: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    """`steps` with the step already taken from it put back in front; closing it closes `steps`."""
    try:
        if first is not None:
            yield first
            yield from steps
    finally:
        _close(steps)


def merge_prompts(prompts: Sequence[SlicePrompt]) -> list[SlicePrompt]:
    """One prompt per slice, sorted by z: points of the same slice joined, its box kept (validation allows one)."""
    by_z: dict[int, SlicePrompt] = {}
    for p in prompts:
        old = by_z.get(p.z)
        if old is None:
            by_z[p.z] = p
            continue
        points = [a for a in (old.points, p.points) if a is not None]
        labels = [a for a in (old.labels, p.labels) if a is not None]
        by_z[p.z] = SlicePrompt(p.z, p.box if p.box is not None else old.box,
                                np.concatenate(points) if points else None, np.concatenate(labels) if labels else None)
    return [by_z[z] for z in sorted(by_z)]


def segment_prompts(
    engine: VolumeEngine,
    state: object,
    *,
    prompts: Sequence[SlicePrompt],
    shape: tuple[int, int, int],
    options: PropagationOptions | None = None,
    budget: Budget | None = None,
    previous: np.ndarray | None = None,
    mask_prompt: bool = False,
    memo: WalkMemo | None = None,
    volume_key: str | None = None,
) -> PromptedResult:
    """The object's mask (uint8 (Z, Y, X)) from its prompts, over `previous` (bool (Z, Y, X)) when given.

    memo + volume_key (the windowed volume's content key): anchor walks replayed from earlier requests."""
    options = options or PropagationOptions()
    merged = merge_prompts(prompts)
    depth = shape[0]
    done = 0

    def check(n: int) -> None:
        nonlocal done
        done += n
        if budget is not None:
            budget.check(done, "slices_processed", advice=ADVICE)

    conditioned = isinstance(engine, PromptedVolumeEngine) and (
        len(merged) > 1 or mask_prompt or any(p.points is not None for p in merged))
    walks: list[tuple[int, dict[int, np.ndarray]]] = []  # (anchor z, z -> logits)
    if conditioned:
        assert isinstance(engine, PromptedVolumeEngine)  # narrowed above; for mypy
        low, high = merged[0].z, merged[-1].z
        for reverse, start, walk in ((False, low, _Walk(depth, high, 1, _reach_past(previous, high, 1))),
                                     (True, high, _Walk(-1, low, -1, _reach_past(previous, low, -1)))):
            if options.direction in ("both", "down" if reverse else "up"):
                steps = engine.track_prompts(state, prompts=merged, reverse=reverse, mask_prompt=mask_prompt)
                walks.append((start, _consume(steps, walk, options, previous, check)))
    else:
        for k, p in enumerate(merged):
            if p.box is None:
                raise ValueError("anchors need a box on every prompted slice")  # refused in core.volumes before this
            up = _Walk(merged[k + 1].z if k + 1 < len(merged) else depth, p.z, 1, _reach_past(previous, p.z, 1))
            down = _Walk(merged[k - 1].z if k > 0 else -1, p.z, -1, _reach_past(previous, p.z, -1))
            ways = [(reverse, walk) for reverse, walk in ((False, up), (True, down))
                    if not ((k == len(merged) - 1 if not reverse else k == 0)
                            and options.direction not in ("both", "down" if reverse else "up"))]
            for n, (reverse, walk) in enumerate(ways):
                box = p.box

                def track(reverse: bool = reverse, box: np.ndarray = box, z: int = p.z) -> Iterator[tuple[int, np.ndarray]]:
                    if memo is not None and volume_key is not None:
                        return memo.track(engine, state, volume_key, key_index=z, box=box, reverse=reverse)
                    return walk_from_box(engine, state, key_index=z, box=box, reverse=reverse)

                steps = track()
                if n == 0 and previous is not None:
                    # An anchor the earlier answer already follows (a prompt of an earlier round, sent again):
                    # its slice alone is taken, its walks are not run again.
                    first = next(steps, None)
                    if first is not None and dice(as_logits(first[1]) > 0, previous[first[0]]) >= AGREE_DICE:
                        _close(steps)
                        walks.append((p.z, {first[0]: as_logits(first[1])}))
                        check(1)
                        break
                    steps = _prepend(first, steps)
                walks.append((p.z, _consume(steps, walk, options, previous, check)))
    return _compose(walks, merged, shape, options, previous, union=conditioned, processed=done)


def _largest_per_walk(found: dict[int, np.ndarray], enabled: bool) -> dict[int, np.ndarray]:
    """z -> bool mask of one walk, its largest 3D component kept (a walk's slices are contiguous)."""
    if not found:
        return {}
    zs = sorted(found)
    stack = np.stack([found[z] > 0 for z in zs]).astype(np.uint8)
    if enabled:
        stack = keep_largest_component(stack)
    return {z: stack[k].astype(bool) for k, z in enumerate(zs)}


def _compose(walks: list[tuple[int, dict[int, np.ndarray]]], prompts: list[SlicePrompt], shape: tuple[int, int, int],
             options: PropagationOptions, previous: np.ndarray | None, *, union: bool, processed: int) -> PromptedResult:
    """Each reached slice from its walks (OR, or the nearest anchor's), the rest from `previous`.

    The largest component is kept per walk, not over the whole answer: with an earlier mask the new walks
    may be separated by slices the earlier answer keeps, and those must not decide which walk survives."""
    masks = [_largest_per_walk(found, options.largest_component) for _, found in walks]
    mask = np.zeros(shape, dtype=np.uint8)
    reached = np.zeros(shape[0], dtype=bool)
    logits: dict[int, np.ndarray] = {}
    for z in sorted({z for _, found in walks for z in found}):
        candidates = sorted((abs(z - anchor), k) for k, (anchor, found) in enumerate(walks) if z in found)
        chosen = [k for _, k in candidates] if union else [candidates[0][1]]
        slice_mask = np.logical_or.reduce([masks[k][z] for k in chosen])
        mask[z] = slice_mask
        reached[z] = True
        if options.keep_logits and slice_mask.any():
            best = np.maximum.reduce([walks[k][1][z] for k in chosen]) if len(chosen) > 1 else walks[chosen[0]][1][z]
            logits[z] = np.where(slice_mask, best, np.float32(-1.0))
    if previous is not None:
        untouched = ~reached
        mask[untouched] = previous[untouched]
    for p in prompts:
        reached[p.z] = True
    return PromptedResult(mask=mask, slices_processed=processed, logits=logits, reached=reached)
