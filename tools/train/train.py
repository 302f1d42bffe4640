#!/usr/bin/python3
"""tools/train/train.py - trains the bundled LLaVA-style model on synthetic scenes.

    /usr/bin/python3 tools/train/train.py --out /work/models/run1 --minutes 60 --threads 2
    /usr/bin/python3 tools/train/train.py --out DIR --resume      # continue DIR/ckpt.pt

The defaults are the settings proposed for a one-hour CPU run: 60x60
images, patch 10 (36 image rows), ViT 128 wide with 3 blocks run, decoder
192 wide with 4 layers (2.57M parameters), 16 images x 4 turns per step,
AdamW at 5e-4, and the auxiliary per-cell head (see model.AuxHead).

Seeded and reproducible: the weights come from --seed, sample i of the run is
a pure function of (--seed, i) (see data.py), and a resumed run continues
with the same samples, optimizer state and schedule. Runs on CUDA when it is
there (bf16 autocast) and on CPU otherwise (f32). AdamW with linear warm-up
and a cosine decay to 10% of --lr; the loss is on answer tokens only.

Schedule length: --samples N fixes it (reproducible to the bit on one
machine). With only --minutes, the cosine follows the elapsed fraction of
the time budget instead (the run ends on time, with the learning rate
decayed, but the number of steps depends on the machine's speed; the
budget counts over resumes). With both, --samples sets the schedule and
--minutes limits this invocation (resume later to go on). --resume with
neither continues the saved schedule.

Writes DIR/ckpt.pt (atomically, every --save-minutes and at the end),
DIR/log.jsonl (one line per log/validation event) and prints progress:
samples/s and periodic validation accuracy on validation-split scenes.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

# On a shared machine busy-waiting OpenMP threads cost ten times their
# work (measured: 6.5 instead of 69 turns per CPU-second with 2 threads);
# passive waiting must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import scenes  # noqa: E402
import vocab as vocab_mod  # noqa: E402
from data import BatchDataset, SampleMaker, collate  # noqa: E402
from evaluate import make_items, score, torch_answers  # noqa: E402
from model import Config, LlavaModel  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", required=True, help="run folder (checkpoint and log)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    ap.add_argument("--seed", type=int, default=1)
    # Model.
    ap.add_argument("--image-size", type=int, default=60)
    ap.add_argument("--patch", type=int, default=10)
    ap.add_argument("--v-width", type=int, default=128)
    ap.add_argument("--v-layers", type=int, default=3, help="vision blocks run (the file stores one more)")
    ap.add_argument("--v-heads", type=int, default=4)
    ap.add_argument("--v-ff", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--d-ff", type=int, default=512)
    # Optimisation.
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--turns", type=int, default=4, help="turns (samples) per image")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--samples", type=int, default=0, help="schedule length in samples")
    ap.add_argument("--minutes", type=float, default=0, help="time budget (see the header)")
    ap.add_argument("--caption-frac", type=float, default=1.0, help="share of images whose first turn is the caption")
    ap.add_argument("--jpeg-prob", type=float, default=0.2)
    ap.add_argument("--aux-weight", type=float, default=1.0,
                    help="weight of the training-only per-cell attribute loss (0 = no auxiliary head)")
    # Machinery.
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--workers", type=int, default=0, help="data loader processes")
    ap.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--log-every", type=int, default=20, help="steps")
    ap.add_argument("--val-every", type=int, default=500, help="steps (0 = only at the end)")
    ap.add_argument("--val-scenes", type=int, default=40)
    ap.add_argument("--save-minutes", type=float, default=5)
    a = ap.parse_args(argv)
    if not a.samples and not a.minutes and not a.resume:
        ap.error("give --samples, --minutes or both")
    return a


def lr_at(a, progress, step):
    """Linear warm-up over a.warmup steps, then cosine from a.lr down to
    a.min_lr_frac * a.lr as progress goes 0 -> 1."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(max(progress, 0.0), 1.0)
    lo = a.lr * a.min_lr_frac
    return lo + (a.lr - lo) * 0.5 * (1 + math.cos(math.pi * p))


def save(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_step(model, pixels, buckets, cells, prefix_ids, device, use_amp, aux_weight):
    """Forward + backward on one batch. The prefix is run once (batch 1),
    the image rows once per image, and every turn attends to its image's
    cached keys/values, exactly as if it were a separate sample. Returns
    the mean loss over answer tokens and the number of answer tokens."""
    P = len(prefix_ids)
    n_tok = sum(int(b["targets"].numel()) for b in buckets)
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp
           else contextlib.nullcontext())
    with amp:
        pre = torch.tensor(prefix_ids, device=device)
        _, past = model.decode(model.tok_embd(pre)[None], torch.arange(P, device=device)[None])
        feats = model.vision.features(pixels)                       # [B][n][W]
        img = model.vision.project(feats)                           # [B][n][d]
        n = img.shape[1]
        pos = (P + torch.arange(n, device=device))[None].expand(img.shape[0], -1)
        _, past = model.decode(img, pos, past)
        loss = 0.0
        for b in buckets:
            x = model.tok_embd(b["text_in"])
            pos = (P + n + torch.arange(x.shape[1], device=device))[None].expand(x.shape[0], -1)
            h, _ = model.decode(x, pos, past, past_index=b["img"])
            logits = model.logits(h[b["bi"], b["ri"]])
            loss = loss + F.cross_entropy(logits.float(), b["targets"], reduction="sum")
        total = loss / n_tok
        if model.aux is not None and aux_weight > 0:
            aux = sum(F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), cells[..., i].reshape(-1))
                      for i, lg in enumerate(model.aux(feats)))
            total = total + aux_weight * aux
    total.backward()
    return float(loss) / n_tok, n_tok


def validate(model, vocab, a, device):
    model.eval()
    items = make_items(scenes.VAL_BEGIN, a.val_scenes)
    texts = torch_answers(model, vocab, items, model.c.image_size)
    model.train()
    return score(items, texts)


def identity(x):
    return x


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    ck_path = os.path.join(a.out, "ckpt.pt")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_amp = device.startswith("cuda")
    logf = open(os.path.join(a.out, "log.jsonl"), "a")

    def log(msg, **rec):
        print(msg, flush=True)
        if rec:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    if a.resume:
        ck = torch.load(ck_path, map_location="cpu")
        # The model and data settings come from the checkpoint; the budget
        # and machinery options from this command line.
        saved = ck["args"]
        for k in ("seed", "image_size", "patch", "v_width", "v_layers", "v_heads", "v_ff", "d_model",
                  "layers", "heads", "kv_heads", "d_ff", "batch", "lr", "min_lr_frac", "warmup",
                  "weight_decay", "turns", "caption_frac", "jpeg_prob", "aux_weight"):
            setattr(a, k, saved.get(k, getattr(a, k)))
        if not a.samples and not a.minutes:
            # Continue the saved schedule: its sample count, or its total
            # time budget when the schedule is time-based.
            a.samples = saved["samples"]
            a.minutes = 0 if saved["samples"] else saved["minutes"]
        vocab = vocab_mod.Vocab(*ck["vocab"])
        cfg = Config(**ck["config"])
    else:
        vocab = vocab_mod.default_vocab()
        cfg = Config(image_size=a.image_size, patch=a.patch, v_width=a.v_width, v_layers=a.v_layers,
                     v_heads=a.v_heads, v_ff=a.v_ff, d_model=a.d_model, n_layers=a.layers,
                     n_heads=a.heads, n_kv_heads=a.kv_heads, d_ff=a.d_ff, n_vocab=len(vocab),
                     aux_head=a.aux_weight > 0)
    torch.manual_seed(a.seed)
    model = LlavaModel(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=a.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-8)
    step, seen, elapsed_before = 0, 0, 0.0
    if a.resume:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, seen, elapsed_before = ck["step"], ck["samples_seen"], ck["elapsed_s"]
        log("resumed %s at step %d (%d samples, %.1f min)" % (ck_path, step, seen, elapsed_before / 60))
    maker = SampleMaker(vocab, cfg.image_size, a.seed, a.turns, a.caption_frac, a.jpeg_prob)
    total_steps = a.samples // (a.batch * a.turns) if a.samples else 0
    log("model: %.2fM parameters (vision+projector %.2fM), vocab %d, %d image rows; device %s, "
        "threads %d; batch %d images x %d turns, %s" % (
            model.n_params() / 1e6, sum(p.numel() for p in model.vision.parameters()) / 1e6,
            len(vocab), cfg.n_patches, device, torch.get_num_threads(), a.batch, a.turns,
            ("%d steps" % total_steps) + (", stop after %.1f min" % a.minutes if a.minutes else "")
            if total_steps else "%.1f min (time-based schedule)" % a.minutes),
        event="start", config=cfg.to_dict(), args=vars(a), n_params=model.n_params())

    def checkpoint():
        save(ck_path, dict(config=cfg.to_dict(), model=model.state_dict(), opt=opt.state_dict(),
                           step=step, samples_seen=seen, elapsed_s=elapsed_before + time.time() - t0,
                           args=vars(a), vocab=(vocab.tokens, vocab.scores, vocab.types)))

    ds = BatchDataset(maker, a.batch, step)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=a.workers,
                                         collate_fn=identity,
                                         prefetch_factor=4 if a.workers else 2)
    model.train()
    t0 = time.time()
    t_log, seen_log, loss_acc, n_acc = t0, seen, 0.0, 0
    t_save = t0
    # A time-based schedule counts the minutes over all resumes; with
    # --samples, --minutes only limits this invocation.
    budget_s = a.minutes * 60 if a.minutes else float("inf")
    if total_steps:
        budget_s += elapsed_before
    for got_step, samples in loader:
        assert got_step == step, (got_step, step)
        elapsed = elapsed_before + time.time() - t0
        if total_steps:
            progress = step / total_steps
        else:
            progress = elapsed / budget_s
        if (total_steps and step >= total_steps) or elapsed >= budget_s:
            break
        lr = lr_at(a, progress, step)
        for g in opt.param_groups:
            g["lr"] = lr
        pixels, buckets, cells = collate(samples, device)
        loss, _ = train_step(model, pixels, buckets, cells, maker.prefix_ids, device, use_amp, a.aux_weight)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += len(samples) * a.turns
        loss_acc += loss
        n_acc += 1
        now = time.time()
        if step % a.log_every == 0:
            sps = (seen - seen_log) / (now - t_log)
            log("step %6d  samples %8d  loss %.4f  lr %.2e  %.1f samples/s  %.1f min" % (
                step, seen, loss_acc / n_acc, lr, sps, (elapsed_before + now - t0) / 60),
                event="log", step=step, samples=seen, loss=loss_acc / n_acc, lr=lr,
                samples_per_s=sps, minutes=(elapsed_before + now - t0) / 60)
            t_log, seen_log, loss_acc, n_acc = now, seen, 0.0, 0
        if a.val_every and step % a.val_every == 0:
            tv = time.time()
            r = validate(model, vocab, a, device)
            log("  validation (%d scenes): caption %.1f%%  QA %.1f%%  %s  (%.0f s)" % (
                a.val_scenes, 100 * r["caption_accuracy"], 100 * r["qa_accuracy"],
                " ".join("%s %.0f" % (k, 100 * v) for k, v in r["qa_by_type"].items()), time.time() - tv),
                event="val", step=step, samples=seen, **r)
            t_log += time.time() - tv
        if now - t_save > a.save_minutes * 60:
            checkpoint()
            t_save = now
    checkpoint()
    r = validate(model, vocab, a, device)
    log("final validation (%d scenes): caption %.1f%%  QA %.1f%%  %s" % (
        a.val_scenes, 100 * r["caption_accuracy"], 100 * r["qa_accuracy"],
        " ".join("%s %.0f" % (k, 100 * v) for k, v in r["qa_by_type"].items())),
        event="final", step=step, samples=seen, minutes=(elapsed_before + time.time() - t0) / 60, **r)
    log("checkpoint: %s (step %d, %d samples)" % (ck_path, step, seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
