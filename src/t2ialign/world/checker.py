"""ShapesEval: an exact checker of whether an RGB image shows what its prompt says.

It looks only at pixels, never at the renderer's bookkeeping, so it scores images from any source:

1. background: the background colour that the most pixels lie close to;
2. objects: every pixel far from that background is labelled with its nearest palette colour;
   connected regions of one object colour (8-connectivity) larger than ``min_area`` are objects;
3. shape: from each region's fill of its bounding box and its width profile (a triangle is narrow at
   the top, a square fills its box, a circle does neither);
4. the decision, with a reason per attribute (count, shape, colour, background, position).

Images are ``uint8`` arrays (H, W, 3), float arrays in [0, 1], or torch tensors (3, H, W), float in
[0, 1] or ``uint8``; other integer types are an error (they would otherwise be clipped silently).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from t2ialign.world.grammar import parse
from t2ialign.world.scene import relation_holds
from t2ialign.world.spec import Spec
from t2ialign.world.vocab import BACKGROUNDS, COLORS

_OBJ_NAMES = list(COLORS)
_BG_NAMES = list(BACKGROUNDS)
_PALETTE = (
    np.array([COLORS[c] for c in _OBJ_NAMES] + [BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32) / 255.0
)  # (6 + 4, 3)
BG_RADIUS = 0.2  # a pixel within this RGB distance of a background colour belongs to it
OBJ_DISTANCE = 0.2  # object pixels lie at least this far from the image's background colour
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    cx: float  # centre, fraction of the image width
    cy: float
    area: int  # pixels


@dataclass
class Detection:
    background: str
    objects: list[DetectedObject]


@dataclass
class CheckResult:
    correct: bool
    task: str
    ok: dict[str, bool] = field(default_factory=dict)  # attribute -> passed
    reasons: dict[str, str] = field(default_factory=dict)  # attribute -> explanation
    detection: Detection | None = None


def to_float_image(image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from uint8 HWC, float HWC in [0, 1], or a torch CHW tensor
    (float in [0, 1] or uint8)."""
    if hasattr(image, "detach"):  # torch tensor (3, H, W); uint8 tensors hold 0-255
        image = image.detach().cpu()
        image = image.float().numpy() if image.is_floating_point() else image.numpy()
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a torch image must have shape (3, H, W), got {tuple(image.shape)}")
        image = image.transpose(1, 2, 0)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image must be RGB of shape (H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):  # int64 0-255 would silently clip to white
        raise ValueError(f"an image must be uint8 (0-255) or float in [0, 1], got dtype {image.dtype}")
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal circle (ellipse), square and apex-up triangle filling an h x w box, at pixel centres."""
    y = (np.arange(h) + 0.5) / h - 0.5  # in [-0.5, 0.5]
    x = (np.arange(w) + 0.5) / w - 0.5
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return {
        "circle": xx**2 + yy**2 <= 0.25,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(xx) <= (yy + 0.5) / 2,
    }


def _shape_of(mask: np.ndarray) -> str:
    """Classify one region (a boolean crop exactly covering its bounding box) by its best
    intersection-over-union with the ideal shapes fitted to the same box."""
    best, best_iou = "circle", -1.0
    for name, t in _templates(*mask.shape).items():
        iou = (mask & t).sum() / max(1, (mask | t).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    return best


def detect(image, min_area: int | None = None) -> Detection:
    """Find the background and the objects of an image."""
    img = to_float_image(image)  # (H, W, 3)
    H, W, _ = img.shape
    min_area = min_area if min_area is not None else max(4, round(8 * H * W / 1024))
    d = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 10)
    n_obj = len(_OBJ_NAMES)
    bg_counts = (d[:, :, n_obj:] < BG_RADIUS).sum(axis=(0, 1))
    if bg_counts.max() == 0:  # no pixel is close to any background: take the nearest on average
        b = int(np.argmin(d[:, :, n_obj:].mean(axis=(0, 1))))
    else:
        b = int(np.argmax(bg_counts))
    nearest = d.argmin(axis=-1)  # (H, W) index into the palette
    is_obj = (nearest < n_obj) & (d[:, :, n_obj + b] > OBJ_DISTANCE)
    objects: list[DetectedObject] = []
    for ci, cname in enumerate(_OBJ_NAMES):
        labels, n = ndimage.label(is_obj & (nearest == ci), structure=_EIGHT)
        if n == 0:
            continue
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            region = labels[sl] == k
            area = int(region.sum())
            if area < min_area:
                continue
            objects.append(
                DetectedObject(  # centre of the bounding box, as the renderer places it
                    shape=_shape_of(region),
                    color=cname,
                    cx=(sl[1].start + sl[1].stop) / (2 * W),
                    cy=(sl[0].start + sl[0].stop) / (2 * H),
                    area=area,
                )
            )
    return Detection(background=_BG_NAMES[b], objects=objects)


def check(image, prompt_or_spec: str | Spec | dict) -> CheckResult:
    """Whether ``image`` matches the prompt (or spec), with a reason per attribute."""
    spec = prompt_or_spec
    if isinstance(spec, str):
        spec = parse(spec)
    elif isinstance(spec, dict):
        spec = Spec.from_dict(spec)
    det = detect(image)
    found = det.objects
    ok: dict[str, bool] = {}
    why: dict[str, str] = {}

    ok["count"] = len(found) == spec.n_objects
    why["count"] = f"{len(found)} objects found, {spec.n_objects} wanted"
    want_shapes = Counter({o.shape: 0 for o in spec.objects})
    for o in spec.objects:
        want_shapes[o.shape] += o.count
    got_shapes = Counter(o.shape for o in found)
    ok["shape"] = got_shapes == want_shapes
    why["shape"] = f"found {dict(got_shapes)}, wanted {dict(want_shapes)}"
    colored = [o for o in spec.objects if o.color is not None]
    if colored:
        got = {
            (o.shape, o.color): sum(f.shape == o.shape and f.color == o.color for f in found) for o in colored
        }
        ok["color"] = all(got[(o.shape, o.color)] == o.count for o in colored)
        why["color"] = ", ".join(f"{n} {c} {s}" for (s, c), n in got.items()) + " found"
    if spec.background is not None:
        ok["background"] = det.background == spec.background
        why["background"] = f"{det.background} background found, {spec.background} wanted"
    if spec.relation is not None:
        a, b = spec.objects

        def matches(f, o):
            return f.shape == o.shape and (o.color is None or f.color == o.color)

        fa = [f for f in found if matches(f, a)]
        fb = [f for f in found if matches(f, b)]
        if len(fa) == 1 and len(fb) == 1:
            ok["position"] = relation_holds((fa[0].cx, fa[0].cy), (fb[0].cx, fb[0].cy), spec.relation)
            why["position"] = (
                f"first object at ({fa[0].cx:.2f}, {fa[0].cy:.2f}), second at "
                f"({fb[0].cx:.2f}, {fb[0].cy:.2f}); wanted '{spec.relation}'"
            )
        else:
            ok["position"] = False
            why["position"] = f"cannot place: {len(fa)} and {len(fb)} candidates found"
    return CheckResult(correct=all(ok.values()), task=spec.task, ok=ok, reasons=why, detection=det)
