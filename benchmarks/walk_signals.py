"""Stop rules for LiteMedSAM's tracking, tried offline on recorded walks (../shared/data/real).

`record`: for each structure of real_anatomy.py, the walks up and down from one box on the label's
largest slice are run by the served walk (`pipeline/tracking.walk_slices`) with a rule accepting every non-empty
slice (so to the volume's edge or the first empty mask), and every step's signals
(predicted IoU, area, centroid, intensity inside the mask, the mean image embedding inside the mask)
and mask are saved. A stop rule without look-ahead ends a walk at its first rejected slice, so its 3D
answer is a prefix of each recorded walk: `simulate` scores any rule on the recordings in seconds,
with the served post-processing (largest 3D component), against the label and the per-slice ceiling
real_anatomy.py reports. The rule chosen is then confirmed by real_anatomy.py on the served route.

    .venv/bin/python benchmarks/walk_signals.py record --out benchmarks/out/walks
    .venv/bin/python benchmarks/walk_signals.py simulate --out benchmarks/out/walks [--rules a,b]
    .venv/bin/python benchmarks/walk_signals.py oracle|grid|signals --out benchmarks/out/walks
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import harness

MODES = ("record", "simulate", "signals", "oracle", "grid")


def arguments() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--out", default=str(harness.OUT / "walks"))
    parser.add_argument("--only", default="ct,mr,lesion")
    parser.add_argument("--rules", default=None, help="simulate: comma-separated names from RULES (default: all)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--core-quantile", type=float, default=0.5, help="record: the logit quantile of each mask's core")
    return parser


if __name__ == "__main__":  # --help answers before torch is imported
    ARGS = arguments().parse_args()

import cv2
import numpy as np
from real_anatomy import (
    STRUCTURES,
    Structure,
    box_of,
    ceiling_of,
    lesion_structures,
    prepared_of,
    read_scans,
    truth_of,
)

from medsam2_endpoint.engines.base import LITE_NAME
from medsam2_endpoint.engines.lite import IMAGE_SIZE, LiteMedSAMEngine, LiteState
from medsam2_endpoint.pipeline.propagate import keep_largest_component
from medsam2_endpoint.pipeline.tracking import DEFAULT_RULE, SliceStats, TrackRule, walk_slices
from medsam2_endpoint.testing.metrics import dice

LITE = LITE_NAME
# The engine's own walk with every non-empty slice accepted: it runs to the volume's edge or to the first empty
# mask, and starts from the caller's box exactly when the default rule would (min_key_fill).
RECORDING_RULE = TrackRule(min_iou=0.0, min_key_fill=DEFAULT_RULE.min_key_fill, min_key_iou=DEFAULT_RULE.min_key_iou)


def _slug(s: Structure) -> str:
    return f"{s.scan}_{s.name}".replace(" ", "_")


def _embedding_mean(engine: LiteMedSAMEngine, slice_u8: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the slice's (256, 64, 64) image embedding over the mask (area-weighted, in the model frame). The
    slice is encoded again through the engine's 2D interface (the same encoder input as a tracked slice's)."""
    embedding = engine.embed_image(np.repeat(slice_u8[:, :, None], 3, axis=2)).embedding[0].float().numpy()
    frame = (engine.low_res_from_mask(mask) > 0).astype(np.float32)  # (256, 256), padded as the model sees it
    side = IMAGE_SIZE // 4
    weights = cv2.resize(frame, (side, side), interpolation=cv2.INTER_AREA)
    total = float(weights.sum())
    if total == 0:
        return np.zeros(embedding.shape[0], np.float32)
    return np.asarray((embedding * weights).sum(axis=(1, 2)) / total, dtype=np.float32)


def _walk(engine: LiteMedSAMEngine, state: LiteState, volume: np.ndarray, key: int, box: np.ndarray, reverse: bool,
          core_quantile: float) -> tuple[list[int], list[np.ndarray], list[SliceStats], list[np.ndarray]]:
    """One direction of the engine's own `track` (RECORDING_RULE), observed: each slice it yields past the key,
    with the signals measured on its mask (its predicted IoU as the engine recorded it in the state)."""
    zs, masks, stats, embs = [], [], [], []
    walk = walk_slices(engine, state, key_index=key, box=box, reverse=reverse, rule=RECORDING_RULE)
    next(walk)  # the key slice
    for z, logits in walk:
        mask = logits > 0
        if not mask.any():  # the walk's end (the engine yields its rejected slice as empty)
            break
        zs.append(z)
        masks.append(mask)
        stats.append(SliceStats.of(mask, volume[z], state.ious[z], logits, core_quantile))
        embs.append(_embedding_mean(engine, volume[z], mask))
    return zs, masks, stats, embs


def record(out: Path, only: set[str], core_quantile: float) -> None:
    service = harness.service()
    engine = service.registry.get(LITE)
    assert isinstance(engine, LiteMedSAMEngine)
    scans = read_scans()
    structures = [s for s in STRUCTURES if s.scan in only] + (lesion_structures(scans) if "lesion" in only else [])
    out.mkdir(parents=True, exist_ok=True)
    for s in structures:
        image, labels = scans[s.scan]
        truth = truth_of(labels, s)
        prepared = prepared_of(LITE, image, truth, s.window)  # windowed and keyed as the served request
        windowed = prepared.windowed.array
        state = engine.start(windowed, prepared.volume_key)
        key = int(np.argmax(truth.sum(axis=(1, 2))))
        box = np.asarray(box_of(truth[key]))
        logits, iou = engine.slice_logits(state, key, box)
        key_mask = logits > 0
        arrays: dict[str, np.ndarray] = {"truth": truth, "ceiling": ceiling_of(service, LITE, image, truth, s.window),
                                         "key_mask": key_mask, "spacing_zyx": np.array(list(reversed(image.GetSpacing())))}
        key_stats = SliceStats.of(key_mask, windowed[key], iou, logits, core_quantile)
        meta: dict[str, object] = {"key": key, "box": box.tolist(), "key_stats": key_stats.__dict__,
                                   "key_fill_rebase": RECORDING_RULE.keeps_caller_box(key_stats, box)}
        arrays["key_emb"] = _embedding_mean(engine, windowed[key], key_mask)
        ends = {}
        for name, reverse in (("up", False), ("down", True)):
            zs, masks, stats, embs = _walk(engine, state, windowed, key, box, reverse, core_quantile)
            meta[name] = {"zs": zs, "stats": [st.__dict__ for st in stats]}
            ends[name] = zs[-1] if zs else "-"
            arrays[f"{name}_masks"] = np.array(masks, dtype=bool).reshape(len(masks), *truth.shape[1:])
            arrays[f"{name}_embs"] = np.array(embs, dtype=np.float32).reshape(len(embs), 256)
        np.savez_compressed(out / f"{_slug(s)}.npz", **arrays)  # type: ignore[arg-type]
        (out / f"{_slug(s)}.json").write_text(json.dumps(meta))
        print(f"{s.scan} {s.name}: key {key}, up {ends['up']}, down {ends['down']}", flush=True)


# ------------------------------------------------------------------------------------------- simulate


@dataclass
class Step:
    z: int
    stats: SliceStats
    emb: np.ndarray


@dataclass
class Recording:
    name: str
    truth: np.ndarray
    ceiling: np.ndarray
    key: int
    key_mask: np.ndarray
    key_stats: SliceStats
    key_emb: np.ndarray
    rebase: bool
    walks: dict[str, tuple[list[Step], np.ndarray]]
    spacing: tuple[float, float, float]


def load(out: Path) -> list[Recording]:
    recordings = []
    for path in sorted(out.glob("*.json")):
        meta = json.loads(path.read_text())
        arrays = np.load(path.with_suffix(".npz"))
        walks = {}
        for name in ("up", "down"):
            steps = [Step(z, SliceStats(**{**st, "centroid": tuple(st["centroid"])}), e)
                     for z, st, e in zip(meta[name]["zs"], meta[name]["stats"], arrays[f"{name}_embs"], strict=True)]
            walks[name] = (steps, arrays[f"{name}_masks"])
        ks = meta["key_stats"]
        sz, sy, sx = (float(v) for v in arrays["spacing_zyx"])
        recordings.append(Recording(path.stem, arrays["truth"], arrays["ceiling"], meta["key"], arrays["key_mask"],
                                    SliceStats(**{**ks, "centroid": tuple(ks["centroid"])}), arrays["key_emb"],
                                    meta["key_fill_rebase"], walks, (sz, sy, sx)))
    return recordings


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


# A rule here: (step, key reference, previous accepted, context) -> accept. Context carries the key's
# embedding and the slice index within the walk, for signals the engine does not have yet.
Judge = Callable[[Step, Step, Step, dict[str, object]], bool | str]


def run_walk(steps: list[Step], key: Step, judge: Judge, rebase: bool) -> int:
    """How many of the recorded steps the rule accepts before its first rejection ("last": accepted, then stop)."""
    reference, previous = key, key
    for n, step in enumerate(steps):
        context: dict[str, object] = {"n": n, "rebase_first": rebase and n == 0}
        verdict = judge(step, reference, previous, context)
        if verdict == "last":
            return n + 1
        if not verdict:
            return n
        previous = step
        if rebase and n == 0:
            reference = step
    return len(steps)


def answer(rec: Recording, judge: Judge) -> np.ndarray:
    mask = np.zeros(rec.truth.shape, np.uint8)
    mask[rec.key] = rec.key_mask
    key = Step(rec.key, rec.key_stats, rec.key_emb)
    for steps, masks in rec.walks.values():
        n = run_walk(steps, key, judge, rec.rebase)
        for k in range(n):
            mask[steps[k].z] = masks[k]
    return keep_largest_component(mask).astype(bool)


def rule_judge(rule: TrackRule, emb_min: float | None = None, emb_prev_min: float | None = None) -> Judge:
    """A recorded step judged by the engine's own TrackRule (its `accepts`, and `ends_at` for a tapering
    tip: "last"), plus the embedding tests the engine does not have. The core's quantile is the one the
    recording used (`record --core-quantile`); `intensity_core` only switches the core test on."""
    def judge(step: Step, ref: Step, prev: Step, ctx: dict[str, object]) -> bool | str:
        first = bool(ctx["rebase_first"])  # judged without intensity or appearance: it becomes the reference
        if not first and emb_min is not None and cosine(step.emb, ref.emb) < emb_min:
            return False
        if not first and emb_prev_min is not None and cosine(step.emb, prev.emb) < emb_prev_min:
            return False
        if rule.accepts(step.stats, ref.stats, prev.stats, intensity=not first):
            return True
        return "last" if rule.ends_at(step.stats, ref.stats, prev.stats) else False

    return judge


WHOLE = TrackRule(min_iou=0.5, intensity_z=1.5)  # the rule before the core test (key fill is in the recording)


RULES: dict[str, Judge] = {
    "default": rule_judge(DEFAULT_RULE),  # the engine's: intensity on the mask's core
    "whole": rule_judge(WHOLE),  # the default before: intensity over the whole mask
    **{f"core{z}": rule_judge(dataclasses.replace(DEFAULT_RULE, intensity_z=z)) for z in (1.0, 2.0, 2.5)},
    "iou0.5": rule_judge(TrackRule(min_iou=0.5)),
    **{f"emb{v}": rule_judge(WHOLE, emb_min=v) for v in (0.8, 0.85, 0.9, 0.93, 0.95)},
    **{f"embonly{v}": rule_judge(TrackRule(min_iou=0.5), emb_min=v) for v in (0.85, 0.9, 0.93, 0.95)},
    **{f"embprev{v}": rule_judge(WHOLE, emb_prev_min=v) for v in (0.9, 0.95, 0.97)},
    **{f"int{v}": rule_judge(dataclasses.replace(WHOLE, intensity_z=v)) for v in (1.0, 2.0, 2.5)},
    "growth1.5": rule_judge(dataclasses.replace(WHOLE, max_area_growth=1.5)),
    "shift0.5": rule_judge(dataclasses.replace(WHOLE, max_shift=0.5)),
}


def simulate(out: Path, names: list[str], verbose: bool) -> None:
    recordings = load(out)
    print("| rule | mean Dice | mean ceiling | gap | worst gap | > 0.10 below | ends within 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        judge = RULES[name]
        rows = []
        for rec in recordings:
            a = answer(rec, judge)
            t_span = np.flatnonzero(rec.truth.any(axis=(1, 2)))
            a_span = np.flatnonzero(a.any(axis=(1, 2)))
            ends = bool(a_span.size and abs(a_span[0] - t_span[0]) <= 1 and abs(a_span[-1] - t_span[-1]) <= 1)
            rows.append((rec.name, dice(a, rec.truth), dice(rec.ceiling, rec.truth), ends,
                         f"{a_span[0]}-{a_span[-1]}" if a_span.size else "-", f"{t_span[0]}-{t_span[-1]}"))
            if verbose:
                print(f"  {name} {rec.name}: {rows[-1][1]:.3f} (ceiling {rows[-1][2]:.3f}) {rows[-1][4]} vs {rows[-1][5]}")
        d = np.array([r[1] for r in rows])
        c = np.array([r[2] for r in rows])
        worst = int(np.argmax(c - d))
        print(f"| {name} | {d.mean():.3f} | {c.mean():.3f} | {c.mean() - d.mean():.3f} | {(c - d)[worst]:.3f} ({rows[worst][0]}) "
              f"| {int(((c - d) > 0.10).sum())} | {sum(r[3] for r in rows)}/{len(rows)} |", flush=True)


def grid(out: Path) -> None:
    """Every combination of a few values of each test (the tapering tip too, `end_area_ratio`), best first;
    intensity over the whole mask."""
    recordings = load(out)

    results = []
    for min_iou, z, emb, growth, tip in itertools.product((0.5, 0.6, 0.7), (1.5, 2.0, 2.5, None), (None, 0.8, 0.85),
                                                          (None, 1.5, 2.0), (None, 0.75, 0.9)):
        judge = rule_judge(TrackRule(min_iou=min_iou, intensity_z=z, max_area_growth=growth, end_area_ratio=tip), emb_min=emb)
        d, c, ends = [], [], 0
        for rec in recordings:
            a = answer(rec, judge)
            d.append(dice(a, rec.truth))
            c.append(dice(rec.ceiling, rec.truth))
            t, az = np.flatnonzero(rec.truth.any(axis=(1, 2))), np.flatnonzero(a.any(axis=(1, 2)))
            ends += bool(az.size and abs(az[0] - t[0]) <= 1 and abs(az[-1] - t[-1]) <= 1)
        gap = np.array(c) - np.array(d)
        results.append((float(gap.mean()), ends, int((gap > 0.10).sum()), f"iou {min_iou} int {z} emb {emb} growth {growth} tip {tip}"))
    for title, key in (("by gap", lambda r: r[0]), ("by ends", lambda r: (-r[1], r[0]))):
        print(f"## {title}")
        for gap_mean, ends, below, name in sorted(results, key=key)[:8]:
            print(f"gap {gap_mean:.4f}, ends {ends}/{len(recordings)}, > 0.10 below {below}: {name}")


def oracle(out: Path) -> None:
    """The best any stop rule could do on these walks: each walk's prefix lengths chosen with the label."""
    rows = []
    for rec in load(out):
        (up, up_masks), (down, down_masks) = rec.walks["up"], rec.walks["down"]
        best: tuple[float, np.ndarray] = (-1.0, rec.truth)
        for n_up in range(len(up) + 1):
            for n_down in range(len(down) + 1):
                mask = np.zeros(rec.truth.shape, bool)
                mask[rec.key] = rec.key_mask
                for steps, masks, n in ((up, up_masks, n_up), (down, down_masks, n_down)):
                    for k in range(n):
                        mask[steps[k].z] = masks[k]
                d = dice(mask, rec.truth)
                if d > best[0]:
                    best = (d, mask)
        c = dice(rec.ceiling, rec.truth)
        t, a = np.flatnonzero(rec.truth.any(axis=(1, 2))), np.flatnonzero(best[1].any(axis=(1, 2)))
        ends = bool(abs(a[0] - t[0]) <= 1 and abs(a[-1] - t[-1]) <= 1)
        rows.append((best[0], c, ends))
        print(f"| {rec.name} | {best[0]:.3f} | {c:.3f} | {c - best[0]:+.3f} | {a[0]}-{a[-1]} | {t[0]}-{t[-1]} |")
    dices, ceilings = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    print(f"oracle: mean Dice {dices.mean():.3f}, mean ceiling {ceilings.mean():.3f}, gap {ceilings.mean() - dices.mean():.4f}, "
          f"{int(((ceilings - dices) > 0.10).sum())} more than 0.10 below, ends within 1 slice {sum(r[2] for r in rows)}/{len(rows)}")


def signals(out: Path) -> None:
    """Per structure and walk step: the slice's label Dice beside each signal (to see which separates)."""
    for rec in load(out):
        key = Step(rec.key, rec.key_stats, rec.key_emb)
        print(f"## {rec.name} key {rec.key} area {rec.key_stats.area} mean {rec.key_stats.mean:.1f}±{rec.key_stats.std:.1f} "
              f"iou {rec.key_stats.iou:.2f} rebase {rec.rebase}")
        for way, (steps, masks) in rec.walks.items():
            prev = key
            ref = key
            for n, (step, mask) in enumerate(zip(steps, masks, strict=True)):
                t = rec.truth[step.z]
                d = dice(mask, t) if t.any() else 0.0
                prec = float((mask & t).sum() / max(mask.sum(), 1))
                st = step.stats
                print(f"  {way} z={step.z:3d} label={int(t.sum()):6d} dice={d:.2f} prec={prec:.2f} iou={st.iou:.2f} "
                      f"area={st.area:6d} ratio={st.area / max(prev.stats.area, 1):.2f} "
                      f"int_z={(st.mean - ref.stats.mean) / max(ref.stats.std, 1.0):+.2f} "
                      f"emb_key={cosine(step.emb, ref.emb):.3f} emb_prev={cosine(step.emb, prev.emb):.3f}")
                prev = step
                if rec.rebase and n == 0:
                    ref = step


def main(args: argparse.Namespace) -> int:
    if args.mode == "record":
        record(Path(args.out), set(args.only.split(",")), args.core_quantile)
    elif args.mode == "simulate":
        simulate(Path(args.out), args.rules.split(",") if args.rules else list(RULES), args.verbose)
    elif args.mode == "oracle":
        oracle(Path(args.out))
    elif args.mode == "grid":
        grid(Path(args.out))
    else:
        signals(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
