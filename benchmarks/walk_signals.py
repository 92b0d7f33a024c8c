"""Stop rules for LiteMedSAM's tracking, tried offline on recorded walks (../shared/data/real).

`record`: for each structure of real_anatomy.py, the walks up and down from one box on the label's
largest slice are run to the volume's edge (every non-empty slice accepted), and every step's signals
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
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from real_anatomy import (  # noqa: E402
    STRUCTURES,
    Structure,
    box_of,
    lesion_structures,
    read_scans,
    truth_of,
    volume_key,
)

from medsam2_endpoint.engines.lite import (  # noqa: E402
    DEFAULT_RULE,
    IMAGE_SIZE,
    TRACK_MARGIN_256,
    LiteMedSAMEngine,
    mask_box,
)
from medsam2_endpoint.engines.tracking import SliceStats, TrackRule  # noqa: E402
from medsam2_endpoint.pipeline.propagate import keep_largest_component  # noqa: E402
from medsam2_endpoint.pipeline.window import percentile_window, window_to_uint8  # noqa: E402
from medsam2_endpoint.testing.metrics import dice  # noqa: E402


def _slug(s: Structure) -> str:
    return f"{s.scan}_{s.name}".replace(" ", "_")


def _embedding_mean(engine: LiteMedSAMEngine, state: object, z: int, mask: np.ndarray) -> np.ndarray:
    """Mean of slice z's (256, 64, 64) image embedding over the mask (area-weighted, in the model frame)."""
    embedding = engine._embedding(state, z)[0].float().numpy()  # type: ignore[arg-type]
    h, w = mask.shape
    new_h, new_w = engine._resized_size(h, w)
    side_h, side_w = max(1, round(new_h / 4)), max(1, round(new_w / 4))
    weights = np.zeros((IMAGE_SIZE // 4, IMAGE_SIZE // 4), np.float32)
    weights[:side_h, :side_w] = cv2.resize(mask.astype(np.float32), (side_w, side_h), interpolation=cv2.INTER_AREA)
    total = float(weights.sum())
    if total == 0:
        return np.zeros(embedding.shape[0], np.float32)
    return (embedding * weights).sum(axis=(1, 2)) / total


def _grown_box(mask: np.ndarray, margin: int, margin_frac: float | None, cap: np.ndarray | None = None) -> np.ndarray | None:
    """The mask's box grown by `margin` px, or by `margin_frac` of its smaller side when that is less;
    with `cap` ((width, height)), no side longer than cap's, about the box's centre."""
    if margin_frac is not None and mask.any():
        ys, xs = np.nonzero(mask)
        side = min(int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1))
        margin = min(margin, int(round(margin_frac * side)))
    box = mask_box(mask, margin)
    if box is not None and cap is not None:
        for lo, hi, limit in ((0, 2, cap[0]), (1, 3, cap[1])):
            if box[hi] - box[lo] > limit:
                centre = (box[lo] + box[hi]) / 2
                box[lo], box[hi] = centre - limit / 2, centre + limit / 2
    return box


@dataclass(frozen=True)
class WalkVariant:
    """How a recorded walk prompts each slice; the defaults are the engine's own walk."""

    margin_frac: float | None = None  # grow the box by at most this share of the mask's smaller side
    box_cap: float | None = None  # no side longer than this x the caller's box side
    refine: int = 0  # segment each slice again from its own mask's tight box, this many times
    core_quantile: float = 0.5  # the logit quantile of the core whose mean intensity each step records


def _walk(engine: LiteMedSAMEngine, state: object, volume: np.ndarray, key: int, box: np.ndarray, step: int,
          key_mask: np.ndarray, variant: WalkVariant
          ) -> tuple[list[int], list[np.ndarray], list[SliceStats], list[np.ndarray]]:
    depth, h, w = volume.shape
    margin = math.ceil(TRACK_MARGIN_256 * max(h, w) / IMAGE_SIZE)
    margin_frac = variant.margin_frac
    cap = None if variant.box_cap is None else variant.box_cap * np.array([box[2] - box[0], box[3] - box[1]])
    prompt = box if DEFAULT_RULE.keeps_caller_box(int(key_mask.sum()), box) else _grown_box(key_mask, margin, margin_frac, cap)
    zs, masks, stats, embs = [], [], [], []
    z = key + step
    while prompt is not None and 0 <= z < depth:
        logits, iou = engine.slice_logits(state, z, prompt)  # type: ignore[arg-type]
        mask = logits > 0
        for _ in range(variant.refine):  # the slice again, from its own mask's tight box
            tight = mask_box(mask, 0)
            if tight is None:
                break
            logits, iou = engine.slice_logits(state, z, tight)  # type: ignore[arg-type]
            mask = logits > 0
        if not mask.any():
            break
        zs.append(z)
        masks.append(mask)
        stats.append(SliceStats.of(mask, volume[z], iou, logits, variant.core_quantile))
        embs.append(_embedding_mean(engine, state, z, mask))
        prompt = _grown_box(mask, margin, margin_frac, cap)
        z += step
    return zs, masks, stats, embs


def record(out: Path, only: set[str], variant: WalkVariant) -> None:
    from medsam2_endpoint.core.service import Service
    from medsam2_endpoint.core.settings import Settings

    settings = Settings.from_env({"MEDSAM2_WARMUP": "0"}, model_dir=str(HERE / "no-models"))
    engine = Service.from_settings(settings).registry.get("lite-medsam")
    assert isinstance(engine, LiteMedSAMEngine)
    scans = read_scans()
    structures = [s for s in STRUCTURES if s.scan in only] + (lesion_structures(scans) if "lesion" in only else [])
    out.mkdir(parents=True, exist_ok=True)
    for s in structures:
        image, labels = scans[s.scan]
        truth = truth_of(labels, s)
        array = sitk.GetArrayFromImage(image)
        windowed = window_to_uint8(array, s.window if s.window is not None else percentile_window(array))
        state = engine.start(windowed, volume_key(windowed))
        key = int(np.argmax(truth.sum(axis=(1, 2))))
        box = np.asarray(box_of(truth[key]))
        logits, iou = engine.slice_logits(state, key, box)
        key_mask = logits > 0
        ceiling = np.zeros_like(truth)
        for z in np.flatnonzero(truth.any(axis=(1, 2))):
            ceiling[z] = engine.segment_slice(state, int(z), box_of(truth[z]))[0]
        arrays: dict[str, np.ndarray] = {"truth": truth, "ceiling": ceiling, "key_mask": key_mask,
                                         "spacing_zyx": np.array(list(reversed(image.GetSpacing())))}
        meta: dict[str, object] = {"key": key, "box": box.tolist(), "key_stats": SliceStats.of(key_mask, windowed[key], iou, logits, variant.core_quantile).__dict__,
                                   "key_fill_rebase": DEFAULT_RULE.keeps_caller_box(int(key_mask.sum()), box)}
        arrays["key_emb"] = _embedding_mean(engine, state, key, key_mask)
        for name, step in (("up", 1), ("down", -1)):
            zs, masks, stats, embs = _walk(engine, state, windowed, key, box, step, key_mask, variant)
            meta[name] = {"zs": zs, "stats": [st.__dict__ for st in stats]}
            arrays[f"{name}_masks"] = np.array(masks, dtype=bool).reshape(len(masks), *truth.shape[1:])
            arrays[f"{name}_embs"] = np.array(embs, dtype=np.float32).reshape(len(embs), 256)
        np.savez_compressed(out / f"{_slug(s)}.npz", **arrays)
        (out / f"{_slug(s)}.json").write_text(json.dumps(meta))
        print(f"{s.scan} {s.name}: key {key}, up {meta['up']['zs'][-1:] if meta['up']['zs'] else '-'}, "  # type: ignore[index]
              f"down {meta['down']['zs'][-1:] if meta['down']['zs'] else '-'}", flush=True)


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
        recordings.append(Recording(path.stem, arrays["truth"], arrays["ceiling"], meta["key"], arrays["key_mask"],
                                    SliceStats(**{**ks, "centroid": tuple(ks["centroid"])}), arrays["key_emb"],
                                    meta["key_fill_rebase"], walks, tuple(float(v) for v in arrays["spacing_zyx"])))
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
    d, c = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    print(f"oracle: mean Dice {d.mean():.3f}, mean ceiling {c.mean():.3f}, gap {c.mean() - d.mean():.4f}, "
          f"{int(((c - d) > 0.10).sum())} more than 0.10 below, ends within 1 slice {sum(r[2] for r in rows)}/{len(rows)}")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["record", "simulate", "signals", "oracle", "grid"])
    parser.add_argument("--out", default=str(HERE / "out" / "walks"))
    parser.add_argument("--only", default="ct,mr,lesion")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--margin-frac", type=float, default=None,
                        help="record: grow each tracked box by at most this share of the mask's smaller side")
    parser.add_argument("--box-cap", type=float, default=None, help="record: no tracked box side longer than this x the caller's")
    parser.add_argument("--refine", type=int, default=0, help="record: re-segment each slice from its mask's tight box, N times")
    parser.add_argument("--core-quantile", type=float, default=0.5, help="record: the logit quantile of each mask's core")
    args = parser.parse_args(argv)
    if args.mode == "record":
        record(Path(args.out), set(args.only.split(",")), WalkVariant(args.margin_frac, args.box_cap, args.refine, args.core_quantile))
    elif args.mode == "simulate":
        simulate(Path(args.out), args.rules.split(","), args.verbose)
    elif args.mode == "oracle":
        oracle(Path(args.out))
    elif args.mode == "grid":
        grid(Path(args.out))
    else:
        signals(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
