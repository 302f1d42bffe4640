"""tools/train/data.py - training samples and batches in LLaVA-1.5's prompt
layout, and the image preprocessing the engine's `hf` mode does.

One sample is one scene (a training seed) and one turn:
    [BOS] SYSTEM_TEXT "\\nUSER:"      the prefix, identical in every sample
    image rows (n_patches)
    " " question "\\nASSISTANT:"      (SentencePiece space prefix, no BOS)
    " " answer </s>                   loss on these tokens only
exactly as llava-cli evaluates it (system part with BOS, image, user part
without BOS), so the same prompts work with vlm-run, vlmd and llama.cpp.

Sample i of a run is a pure function of (run seed, i): its scene seed (below
scenes.TRAIN_END), its task (caption or one question type) and whether the
image goes through a JPEG round trip. A batch is samples [step*B, step*B+B),
so training is reproducible and resumes exactly.
"""
import io
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import scenes  # noqa: E402
import vocab as vocab_mod  # noqa: E402
from model import CLIP_MEAN, CLIP_STD  # noqa: E402


# ==== Preprocessing (the engine's hf mode) =================================

def expand2square(img):
    """LLaVA's expand2square: pad to a centred square with the CLIP mean colour."""
    w, h = img.size
    if w == h:
        return img
    n = max(w, h)
    out = Image.new("RGB", (n, n), tuple(int(x * 255) for x in CLIP_MEAN))
    out.paste(img, ((n - w) // 2, (n - h) // 2))
    return out


def preprocess_hf(img, size, mean=CLIP_MEAN, std=CLIP_STD):
    """A PIL image -> float32 [3][size][size]: RGB, expand2square, Pillow
    bicubic resize when the side differs, u8/255, (v - mean) / std."""
    img = expand2square(img.convert("RGB"))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return normalize_u8(np.asarray(img, np.uint8), mean, std)


def normalize_u8(a, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 [H][W][3] -> float32 [3][H][W] normalised, in float32 as clip.cpp."""
    x = a.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ==== Samples ==============================================================

class SampleMaker:
    """Builds tokenized training images with their turns.

    Image i of a run has `turns` turns that share its prefix and image rows
    (each turn is a complete single-turn sample: the trainer computes the
    prefix and the image rows once and lets every turn attend to them, which
    is the same computation as `turns` separate samples at a fraction of the
    cost): turn 0 is the caption with probability caption_frac (else a
    question), the others are questions of distinct types. jpeg_prob: share
    of images that go through a JPEG round trip (quality 60-95), so that
    JPEG inputs work too."""

    def __init__(self, vocab, image_size, run_seed=0, turns=4, caption_frac=1.0, jpeg_prob=0.2):
        self.vocab = vocab
        self.image_size = image_size
        self.run_seed = run_seed
        self.turns = turns
        self.caption_frac = caption_frac
        self.jpeg_prob = jpeg_prob
        self.prefix_ids = vocab.encode(vocab_mod.SYSTEM_PART, add_bos=True)
        self._cache = {}

    def encode_cached(self, text):
        ids = self._cache.get(text)
        if ids is None:
            ids = self.vocab.encode(text)
            if len(self._cache) < 200000:
                self._cache[text] = ids
        return ids

    def user_ids(self, question):
        return self.encode_cached(question + vocab_mod.USER_SUFFIX)

    def answer_ids(self, answer):
        return self.encode_cached(answer) + [vocab_mod.EOS]

    def sample(self, i):
        """Image i: dict(pixels uint8 [S][S][3], turns: list of dict(user ids,
        answer ids, kind))."""
        rng = np.random.default_rng([self.run_seed, int(i), 77])
        seed = int(rng.integers(scenes.TRAIN_BEGIN, scenes.TRAIN_END))
        sc = scenes.make_scene(seed)
        img = scenes.render(sc, self.image_size)
        if rng.random() < self.jpeg_prob:
            q = int(rng.integers(60, 96))
            img = Image.open(io.BytesIO(scenes.encode(img, "jpeg", q))).convert("RGB")
        kinds = list(rng.permutation(scenes.QA_TYPES))
        if rng.random() < self.caption_frac:
            kinds.insert(0, "caption")
        turns = []
        for k in range(self.turns):
            kind = kinds[k % len(kinds)]
            if kind == "caption":
                qtext, answer = scenes.CAPTION_PROMPT, scenes.caption(sc)
            else:
                qtext, answer = scenes.make_question(sc, kind, rng)
            turns.append(dict(user=self.user_ids(qtext), answer=self.answer_ids(answer), kind=kind))
        cells = np.zeros((9, 3), np.int64)      # per cell: shape, colour, size (+1; 0 = empty)
        for o in sc["objects"]:
            cells[o["cell"]] = (1 + scenes.SHAPES.index(o["shape"]), 1 + scenes.COLOR_NAMES.index(o["color"]),
                                1 + scenes.SIZES.index(o["size"]))
        return dict(pixels=np.asarray(img, np.uint8), turns=turns, cells=cells)

    def batch(self, step, n_images):
        return [self.sample(step * n_images + j) for j in range(n_images)]


def collate(images, device, n_buckets=2):
    """Tensors for one batch: pixels [B][3][S][S]; for the turns sorted
    by length into n_buckets buckets, per bucket: text_in [Bb][Lt] (user
    part + answer without its last token, right-padded with 0), img [Bb]
    (the image each turn belongs to), and bi/ri/targets: the (row, position)
    of every input that predicts an answer token, and that token; and the
    cell labels [B][9][3] for the auxiliary head."""
    pix = np.stack([normalize_u8(s["pixels"]) for s in images])
    turns = [(b, t) for b, s in enumerate(images) for t in s["turns"]]
    turns.sort(key=lambda bt: len(bt[1]["user"]) + len(bt[1]["answer"]))
    size = (len(turns) + n_buckets - 1) // n_buckets
    buckets = []
    for start in range(0, len(turns), size):
        part = turns[start:start + size]
        texts = [t["user"] + t["answer"][:-1] for _, t in part]
        Lt = max(len(x) for x in texts)
        text_in = torch.zeros(len(part), Lt, dtype=torch.long)
        bi, ri, tg = [], [], []
        for r, (b, t) in enumerate(part):
            text_in[r, :len(texts[r])] = torch.tensor(texts[r])
            Lu = len(t["user"])
            for k, tok in enumerate(t["answer"]):
                bi.append(r)
                ri.append(Lu - 1 + k)
                tg.append(tok)
        buckets.append(dict(text_in=text_in.to(device),
                            img=torch.tensor([b for b, _ in part], device=device),
                            bi=torch.tensor(bi, device=device), ri=torch.tensor(ri, device=device),
                            targets=torch.tensor(tg, device=device)))
    cells = torch.from_numpy(np.stack([s["cells"] for s in images])).to(device)    # [B][9][3]
    return torch.from_numpy(pix).to(device), buckets, cells


class BatchDataset(torch.utils.data.IterableDataset):
    """Yields (step, list of samples) for steps start.. (worker k of n takes
    steps congruent to k mod n; the trainer puts them back in order)."""

    def __init__(self, maker, batch_size, start_step):
        self.maker = maker
        self.batch_size = batch_size
        self.start_step = start_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, n = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + k
        while True:
            yield step, self.maker.batch(step, self.batch_size)
            step += n
