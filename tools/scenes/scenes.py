#!/usr/bin/python3
"""tools/scenes/scenes.py - the synthetic scene world of the bundled model.

A scene is 1-4 coloured shapes on a 3x3 grid (at most one per cell) over a
textured, low-saturation background. Everything is a pure function of an
integer seed, so a seed names a scene forever: its objects, its pixels (at
any image size), its caption and its questions. The bundled model is
trained on seeds below TRAIN_END and measured on seeds it never saw.

Seed ranges (disjoint):
    train       [0,         1,000,000)   TRAIN_BEGIN .. TRAIN_END
    validation  [1,000,000, 2,000,000)   VAL_BEGIN   .. VAL_END
    test        [2,000,000, 3,000,000)   TEST_BEGIN  .. TEST_END (held out;
                                         tools/eval starts at TEST_BEGIN)

The language is small and canonical:
  caption   "two shapes: a small red circle at the top left and a large blue
             square in the center" (objects in raster order of their cells;
             "A, B and C" for three or more)
  questions one type each of colour, shape, count, presence, position and
            relation, with one- or few-word answers ("red", "star", "two",
            "yes", "top left", "a small red circle" / "nothing").
parse_caption() maps a caption back to its set of objects, for caption
accuracy.

Used as a module (import scenes) by the trainer and tools/eval, and as a CLI:
    tools/scenes/scenes.py --first-seed 2000000 --count 4 --out DIR [--size 60]
        [--format png|jpeg|both]
writes DIR/scene-<seed>.png|.jpg and DIR/scenes.jsonl (caption, questions).
"""
import argparse
import io
import json
import os
import re
import sys

import numpy as np
from PIL import Image, ImageDraw

# ==== The world ============================================================

TRAIN_BEGIN, TRAIN_END = 0, 1_000_000
VAL_BEGIN, VAL_END = 1_000_000, 2_000_000
TEST_BEGIN, TEST_END = 2_000_000, 3_000_000

SHAPES = ["circle", "square", "triangle", "star", "cross"]

# Saturated, well separated hues; backgrounds stay near grey so that no
# object colour can be confused with the background.
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 135, 15),
    "yellow": (240, 225, 25),
    "green": (30, 165, 45),
    "cyan": (20, 205, 215),
    "blue": (30, 60, 225),
    "purple": (135, 40, 190),
    "pink": (250, 115, 190),
}
COLOR_NAMES = list(COLORS)
SIZES = ["small", "large"]

# Cells in raster order; cell = 3 * row + column.
CELL_NAMES = ["top left", "top", "top right", "left", "center", "right",
              "bottom left", "bottom", "bottom right"]
# The phrase used in captions ("a small red circle at the top left").
CELL_PHRASES = ["at the top left", "at the top", "at the top right",
                "on the left", "in the center", "on the right",
                "at the bottom left", "at the bottom", "at the bottom right"]
PLURALS = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]
QA_TYPES = ["colour", "shape", "count", "presence", "position", "relation"]
RELATIONS = ["left of", "right of", "above", "below"]
BACKGROUNDS = ["flat", "gradient", "noise", "stripes", "checker", "blotches"]

CAPTION_PROMPT = "Describe the image."
DEFAULT_SIZE = 60   # the bundled model's clip.vision.image_size

# Relative geometry (fractions of the image side).
_RADIUS = {"small": 0.075, "large": 0.13}
_JITTER = 0.035
_SUPERSAMPLE = 4


def _rng(seed, stream):
    """An independent numpy generator for one purpose of one seed."""
    return np.random.default_rng([int(seed), stream])


def make_scene(seed):
    """The scene of a seed: a dict with 'seed', 'objects' (list of dicts with
    shape, color, size, cell; sorted by cell) and 'background'."""
    rng = _rng(seed, 0)
    n = int(rng.integers(1, 5))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())
    objects = []
    for cell in cells:
        objects.append(dict(shape=SHAPES[rng.integers(len(SHAPES))],
                            color=COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
                            size=SIZES[rng.integers(2)],
                            cell=int(cell)))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return dict(seed=int(seed), objects=objects, background=background)


# ==== Rendering ============================================================

def _background(rng, kind, s):
    """A float32 [s][s][3] background in 0..255: a greyish base with a
    texture of the given kind."""
    base = rng.uniform(70, 185)
    tint = rng.uniform(-14, 14, size=3)
    img = np.full((s, s, 3), base, np.float32) + tint.astype(np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    amp = rng.uniform(10, 28)
    if kind == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        g = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) * 2 * amp * 1.5
        img += g[..., None]
    elif kind == "noise":
        img += rng.normal(0, amp * 0.6, size=(s, s, 1)).astype(np.float32)
        img += rng.normal(0, amp * 0.2, size=(s, s, 3)).astype(np.float32)
    elif kind == "stripes":
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(0.06, 0.2)
        t = (np.cos(ang) * xx + np.sin(ang) * yy) / period
        img += (amp * np.sign(np.sin(2 * np.pi * t)))[..., None] * 0.6
    elif kind == "checker":
        k = int(rng.integers(3, 9))
        c = ((np.floor(xx * k) + np.floor(yy * k)) % 2) * 2 - 1
        img += (amp * 0.6 * c)[..., None]
    elif kind == "blotches":
        g = (rng.normal(0, 1, size=(5, 5, 1)) + rng.normal(0, 0.3, size=(5, 5, 3))).astype(np.float32)
        up = np.asarray(Image.fromarray(((g * 40) + 128).clip(0, 255).astype(np.uint8))
                        .resize((s, s), Image.BICUBIC), np.float32) - 128
        img += up * (amp / 40.0) * 1.2
    if kind != "flat":
        img += rng.normal(0, 3, size=(s, s, 1)).astype(np.float32)
    return img


def _shape_polygon(shape, cx, cy, r):
    """Vertices of a polygon shape centred at (cx, cy) with size r."""
    if shape == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = r * 1.18
        cy2 = cy + R * 0.12
        return [(cx + R * np.cos(a), cy2 - R * np.sin(a))
                for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
    if shape == "star":
        R, ri = r * 1.2, r * 1.2 * 0.45
        pts = []
        for i in range(10):
            a = np.pi / 2 + i * np.pi / 5
            rr = R if i % 2 == 0 else ri
            pts.append((cx + rr * np.cos(a), cy + 0.06 * R - rr * np.sin(a)))
        return pts
    if shape == "cross":
        a, t = r * 1.05, r * 0.36
        return [(cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t),
                (cx + a, cy + t), (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a),
                (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def render(scene, size=64):
    """The scene as an RGB PIL image of size x size. Deterministic: the
    jitter and the background come from the scene's seed."""
    rng = _rng(scene["seed"], 1)
    s = int(size)
    bg = _background(rng, scene["background"], s)
    S = s * _SUPERSAMPLE
    color_layer = Image.new("RGB", (S, S))
    mask = Image.new("L", (S, S))
    dc, dm = ImageDraw.Draw(color_layer), ImageDraw.Draw(mask)
    for o in scene["objects"]:
        row, col = divmod(o["cell"], 3)
        jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
        cx = ((col + 0.5) / 3 + jx) * S
        cy = ((row + 0.5) / 3 + jy) * S
        r = _RADIUS[o["size"]] * rng.uniform(0.92, 1.08) * S
        rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLORS[o["color"]])
        if o["shape"] == "circle":
            box = [cx - r, cy - r, cx + r, cy + r]
            dc.ellipse(box, fill=rgb)
            dm.ellipse(box, fill=255)
        else:
            poly = _shape_polygon(o["shape"], cx, cy, r)
            dc.polygon(poly, fill=rgb)
            dm.polygon(poly, fill=255)
    col_small = np.asarray(color_layer.reduce(_SUPERSAMPLE), np.float32)
    a = np.asarray(mask.reduce(_SUPERSAMPLE), np.float32)[..., None] / 255.0
    # The colour layer was averaged with black outside the shapes: undo that.
    fg = np.where(a > 0, col_small / np.maximum(a, 1e-6), 0)
    out = bg * (1 - a) + fg * a
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def encode(img, fmt="png", quality=90):
    """The bytes of a PIL image as a PNG or baseline JPEG file."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError("format must be png or jpeg, got %r" % fmt)
    return buf.getvalue()


# ==== Language =============================================================

def article(word):
    """'an' before a vowel ('an orange star'), else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def describe(o):
    """'a small red circle' (no position)."""
    return "a %s %s %s" % (o["size"], o["color"], o["shape"])


def join_list(items):
    """'A', 'A and B', 'A, B and C'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene):
    """The canonical caption of a scene."""
    objs = sorted(scene["objects"], key=lambda o: o["cell"])
    n = len(objs)
    head = "%s shape%s:" % (NUMBER_WORDS[n], "" if n == 1 else "s")
    parts = ["%s %s" % (describe(o), CELL_PHRASES[o["cell"]]) for o in objs]
    return head + " " + join_list(parts)


_CAP_OBJ = re.compile(r"(?:a|an) (%s) (%s) (%s) (%s)" % (
    "|".join(SIZES), "|".join(COLOR_NAMES), "|".join(SHAPES),
    "|".join(sorted(CELL_PHRASES, key=len, reverse=True))))
_CAP_HEAD = re.compile(r"^(%s) shapes?:\s*(.*)$" % "|".join(NUMBER_WORDS[1:]))


def object_key(o):
    return (o["size"], o["color"], o["shape"], o["cell"])


def parse_caption(text):
    """Parses a caption back to its objects. Returns (count, set of
    (size, color, shape, cell) tuples), or None when the text is not a
    well-formed caption (unknown words, a wrong list form, ...)."""
    t = text.strip().rstrip(".").strip()
    m = _CAP_HEAD.match(t)
    if not m:
        return None
    count = NUMBER_WORDS.index(m.group(1))
    body = m.group(2)
    objs = []
    pos = 0
    seps = []
    for mo in _CAP_OBJ.finditer(body):
        seps.append(body[pos:mo.start()])
        objs.append((mo.group(1), mo.group(2), mo.group(3), CELL_PHRASES.index(mo.group(4))))
        pos = mo.end()
    if not objs or body[pos:].strip():
        return None
    # The separators must be "", ", ", ..., " and ".
    expect = [""] + [", "] * (len(objs) - 2) + ([" and "] if len(objs) > 1 else [])
    if seps != expect:
        return None
    if len(set(objs)) != len(objs):
        return None
    return count, set(objs)


def caption_correct(text, scene):
    """True when the caption parses to exactly the scene's objects and its
    number word gives their count."""
    p = parse_caption(text)
    if p is None:
        return False
    truth = {object_key(o) for o in scene["objects"]}
    return p[0] == len(truth) and p[1] == truth


def normalize_answer(text):
    return " ".join(text.strip().lower().rstrip(".").split())


# ---- Questions -------------------------------------------------------------

def _reference(o, objs):
    """The shortest canonical phrase naming o uniquely among objs:
    'the star', 'the red star', 'the small red star' or 'the shape at the
    top left'."""
    others = [p for p in objs if p is not o]
    if all(p["shape"] != o["shape"] for p in others):
        return "the %s" % o["shape"]
    if all((p["color"], p["shape"]) != (o["color"], o["shape"]) for p in others):
        return "the %s %s" % (o["color"], o["shape"])
    if all((p["size"], p["color"], p["shape"]) != (o["size"], o["color"], o["shape"])
           for p in others):
        return "the %s %s %s" % (o["size"], o["color"], o["shape"])
    return "the shape %s" % CELL_PHRASES[o["cell"]]


def _related(o, rel, objs):
    """Objects in relation rel to o: 'left of' = same row, smaller column;
    'above' = same column, smaller row; and so on."""
    r0, c0 = divmod(o["cell"], 3)
    out = []
    for p in objs:
        if p is o:
            continue
        r, c = divmod(p["cell"], 3)
        if ((rel == "left of" and r == r0 and c < c0) or
                (rel == "right of" and r == r0 and c > c0) or
                (rel == "above" and c == c0 and r < r0) or
                (rel == "below" and c == c0 and r > r0)):
            out.append(p)
    return sorted(out, key=lambda p: p["cell"])


def make_question(scene, qtype, rng):
    """One (question, answer) of the given type for a scene, drawn with rng
    (a numpy Generator)."""
    objs = scene["objects"]
    o = objs[rng.integers(len(objs))]
    if qtype == "colour":
        if rng.random() < 0.5:
            return "What color is %s?" % _reference(o, objs), o["color"]
        return "What color is the shape %s?" % CELL_PHRASES[o["cell"]], o["color"]
    if qtype == "shape":
        if rng.random() < 0.5:
            return "What shape is %s?" % CELL_PHRASES[o["cell"]], o["shape"]
        # By colour (answer may be one of several: ask only when unique).
        same = [p for p in objs if p["color"] == o["color"]]
        if len(same) == 1:
            return "What shape is the %s one?" % o["color"], o["shape"]
        return "What shape is %s?" % CELL_PHRASES[o["cell"]], o["shape"]
    if qtype == "count":
        k = rng.integers(3)
        if k == 0:
            return "How many shapes are there?", NUMBER_WORDS[len(objs)]
        if k == 1:
            shape = o["shape"] if rng.random() < 0.7 else SHAPES[rng.integers(len(SHAPES))]
            n = sum(p["shape"] == shape for p in objs)
            return "How many %s are there?" % PLURALS[shape], NUMBER_WORDS[n]
        color = o["color"] if rng.random() < 0.7 else COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        n = sum(p["color"] == color for p in objs)
        return "How many %s shapes are there?" % color, NUMBER_WORDS[n]
    if qtype == "presence":
        if rng.random() < 0.5:
            return "Is there %s %s %s?" % (article(o["color"]), o["color"], o["shape"]), "yes"
        # A near miss: change the colour or the shape of an existing object
        # until no object matches.
        for _ in range(20):
            if rng.random() < 0.5:
                c, s = COLOR_NAMES[rng.integers(len(COLOR_NAMES))], o["shape"]
            else:
                c, s = o["color"], SHAPES[rng.integers(len(SHAPES))]
            if all((p["color"], p["shape"]) != (c, s) for p in objs):
                return "Is there %s %s %s?" % (article(c), c, s), "no"
        return "Is there %s %s %s?" % (article(o["color"]), o["color"], o["shape"]), "yes"
    if qtype == "position":
        named = [p for p in objs if not _reference(p, objs).startswith("the shape ")]
        if named and rng.random() < 0.5:
            p = named[rng.integers(len(named))]
            return "Where is %s?" % _reference(p, objs), CELL_NAMES[p["cell"]]
        # What occupies a cell (occupied about two times in three).
        if rng.random() < 0.65:
            cell = o["cell"]
        else:
            cell = int(rng.integers(9))
        there = [p for p in objs if p["cell"] == cell]
        return ("What is %s?" % CELL_PHRASES[cell],
                describe(there[0]) if there else "nothing")
    if qtype == "relation":
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        ref = _reference(o, objs)
        rel_objs = _related(o, rel, objs)
        ans = join_list([describe(p) for p in rel_objs]) if rel_objs else "nothing"
        return "What is %s %s?" % (rel, ref), ans
    raise ValueError("unknown question type %r" % qtype)


def questions(scene, per_type=1):
    """The canonical evaluation questions of a scene: per_type of each type
    in QA_TYPES, as a list of (type, question, answer). Deterministic."""
    rng = _rng(scene["seed"], 2)
    out = []
    for qt in QA_TYPES:
        for _ in range(per_type):
            q, a = make_question(scene, qt, rng)
            out.append((qt, q, a))
    return out


def all_texts():
    """Every word form the language can produce (questions, answers and
    captions), for building the vocabulary."""
    words = set()
    rng = np.random.default_rng(12345)
    for seed in range(3000):
        sc = make_scene(seed)
        words.update(caption(sc).split(" "))
        for qt in QA_TYPES:
            q, a = make_question(sc, qt, rng)
            words.update(q.split(" "))
            words.update(a.split(" "))
    words.update(CAPTION_PROMPT.split(" "))
    return words


# ==== Evaluation items and scoring ===========================================

def eval_items(first_seed, count, per_type=1):
    """The evaluation prompts of scenes first_seed .. first_seed+count-1:
    per scene one caption prompt and per_type questions of each type, as a
    list of dicts (seed, type, prompt, answer)."""
    items = []
    for seed in range(first_seed, first_seed + count):
        sc = make_scene(seed)
        items.append(dict(seed=seed, type="caption", prompt=CAPTION_PROMPT, answer=caption(sc)))
        for qt, q, a in questions(sc, per_type):
            items.append(dict(seed=seed, type=qt, prompt=q, answer=a))
    return items


def answer_correct(item, text):
    """A caption is right when it parses to exactly the scene's objects; an
    answer when it equals the expected one after normalize_answer()."""
    if item["type"] == "caption":
        return caption_correct(text, make_scene(item["seed"]))
    return normalize_answer(text) == normalize_answer(item["answer"])


def score(items, texts):
    """Accuracy of texts[i] as answers to items[i]: a dict with
    caption_accuracy, qa_accuracy (fractions), qa_by_type, n_captions,
    n_questions."""
    cap = [answer_correct(it, t) for it, t in zip(items, texts) if it["type"] == "caption"]
    by = {}
    for it, t in zip(items, texts):
        if it["type"] != "caption":
            by.setdefault(it["type"], []).append(answer_correct(it, t))
    qa = [x for v in by.values() for x in v]
    mean = lambda v: (sum(v) / len(v)) if v else 0.0  # noqa: E731
    return dict(caption_accuracy=mean(cap), qa_accuracy=mean(qa),
                qa_by_type={k: mean(by[k]) for k in QA_TYPES if k in by},
                n_captions=len(cap), n_questions=len(qa))


# ==== CLI ==================================================================

def main(argv=None):
    ap = argparse.ArgumentParser(description="Write synthetic scenes with their captions and questions.")
    ap.add_argument("--first-seed", type=int, default=TEST_BEGIN)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE,
                    help="image side in pixels (default %d, the bundled model's)" % DEFAULT_SIZE)
    ap.add_argument("--format", choices=["png", "jpeg", "both"], default="png")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scenes.jsonl"), "w") as meta:
        for seed in range(args.first_seed, args.first_seed + args.count):
            sc = make_scene(seed)
            img = render(sc, args.size)
            files = []
            for fmt, ext in (("png", "png"), ("jpeg", "jpg")):
                if args.format in (fmt, "both"):
                    name = "scene-%d.%s" % (seed, ext)
                    with open(os.path.join(args.out, name), "wb") as f:
                        f.write(encode(img, fmt, args.quality))
                    files.append(name)
            rec = dict(seed=seed, files=files, objects=sc["objects"], background=sc["background"],
                       caption=caption(sc),
                       questions=[dict(type=t, question=q, answer=a) for t, q, a in questions(sc)])
            meta.write(json.dumps(rec) + "\n")
            print("%s\t%s" % (" ".join(files), rec["caption"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
