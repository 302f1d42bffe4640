"""tools/train/evaluate.py - accuracy on held-out scenes, for the PyTorch
model (greedy decoding with a KV cache) and, through tools/eval, for the
daemon. Both score the same items the same way, which is what the fidelity
check (daemon accuracy within one point of PyTorch's) compares.

An evaluation item is one (scene, prompt, expected answer, type): per scene
one caption prompt and `per_type` questions of each type from
scenes.questions(). A caption is right when parse_caption() gives exactly
the scene's objects; an answer is right when it equals the expected answer
after normalisation (case, surrounding spaces, a final full stop).
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import scenes  # noqa: E402
import vocab as vocab_mod  # noqa: E402
from data import normalize_u8  # noqa: E402
from model import Config, LlavaModel  # noqa: E402


make_items = scenes.eval_items
is_correct = scenes.answer_correct
score = scenes.score


# ==== PyTorch greedy decoding =============================================

@torch.no_grad()
def generate(model, vocab, pixels, prompts, max_new=64, emulate=False):
    """Greedy answers of model for images pixels (float [B][3][S][S],
    normalised) and prompts (B strings), in llava-cli's layout. Returns the
    B generated texts (stopping at </s>)."""
    c = model.c
    dev = pixels.device
    B = pixels.shape[0]
    prefix = torch.tensor(vocab.encode(vocab_mod.SYSTEM_PART, add_bos=True), device=dev)
    P = prefix.numel()
    _, past = model.decode(model.tok_embd(prefix)[None], torch.arange(P, device=dev)[None],
                           emulate=emulate)
    img = model.vision(pixels, emulate)                     # [B][n][d]
    n = img.shape[1]
    users = [vocab.encode(p + vocab_mod.USER_SUFFIX) for p in prompts]
    U = max(len(u) for u in users)
    # Rest of the prompt, left-padded: [pad][image rows][user tokens].
    x = torch.zeros(B, U + n, c.d_model, device=dev)
    pos = torch.zeros(B, U + n, dtype=torch.long, device=dev)
    mask = torch.ones(B, P + U + n, dtype=torch.bool, device=dev)
    for b, u in enumerate(users):
        pad = U - len(u)
        x[b, pad:pad + n] = img[b]
        x[b, pad + n:] = model.tok_embd(torch.tensor(u, device=dev))
        pos[b, pad:] = P + torch.arange(n + len(u), device=dev)
        mask[b, P:P + pad] = False
    h, past = model.decode(x, pos, past, mask, emulate)
    nxt = model.logits(h[:, -1], emulate).argmax(-1)        # [B]
    cur = pos[:, -1]
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_new):
        for b in range(B):
            if not done[b]:
                if int(nxt[b]) == vocab_mod.EOS:
                    done[b] = True
                else:
                    out[b].append(int(nxt[b]))
        if bool(done.all()):
            break
        cur = cur + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
        h, past = model.decode(model.tok_embd(nxt)[:, None], cur[:, None], past, mask, emulate)
        nxt = model.logits(h[:, -1], emulate).argmax(-1)
    return [vocab.decode(o).strip() for o in out]


def torch_answers(model, vocab, items, image_size, batch=64, log=None):
    """Greedy answers of the PyTorch model to every item (images rendered
    at image_size, as PNG pixels)."""
    dev = next(model.parameters()).device
    texts = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        cache = {}
        for it in chunk:
            if it["seed"] not in cache:
                img = scenes.render(scenes.make_scene(it["seed"]), image_size)
                cache[it["seed"]] = normalize_u8(np.asarray(img, np.uint8))
        pix = [cache[it["seed"]] for it in chunk]
        pixels = torch.from_numpy(np.stack(pix)).to(dev)
        max_new = 64  # as tools/eval asks the daemon (max_tokens 64)
        texts.extend(generate(model, vocab, pixels, [it["prompt"] for it in chunk], max_new))
        if log:
            log("  %d/%d" % (len(texts), len(items)))
    return texts


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, vocab, checkpoint dict) of a training checkpoint."""
    ck = torch.load(path, map_location=device)
    c = Config(**ck["config"])
    model = LlavaModel(c).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    v = vocab_mod.Vocab(*ck["vocab"])
    return model, v, ck


def eval_torch(checkpoint, first_seed, count, per_type=1, device="cpu", batch=64, log=None):
    model, v, _ = load_checkpoint(checkpoint, device)
    items = make_items(first_seed, count, per_type)
    texts = torch_answers(model, v, items, model.c.image_size, batch, log)
    return score(items, texts), items, texts
