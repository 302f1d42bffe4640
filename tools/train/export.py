#!/usr/bin/python3
"""tools/train/export.py - writes a training checkpoint as the two GGUF files
llama.cpp's llava-cli loads: a LLaMA text model and a CLIP "mmproj".

    /usr/bin/python3 tools/train/export.py CKPT OUTDIR [--name NAME]
      -> OUTDIR/text.gguf, OUTDIR/mmproj.gguf  (2-D weights F16, 1-D F32)

Text model: arch `llama`, the llama.* hyperparameters, a SentencePiece
(`tokenizer.ggml.model = llama`) vocabulary with scores and token types,
BOS 1 / EOS 2 / UNK 0, add_bos true. The decoder computes RoPE in llama.cpp's
"normal" (adjacent pairs) layout already, so Q/K rows are written as they are.

mmproj: arch `clip`, clip.projector_type `mlp`, CLIP mean/std, quick-GELU
(clip.use_gelu false), `v.*` and `mm.0` / `mm.2` tensors. llama.cpp names the
vision MLP backwards: `ffn_down` holds fc1 (width -> ff) and `ffn_up` holds
fc2. clip.vision.block_count is the number of trained blocks + 1: llama.cpp
runs block_count - 1 blocks (as real LLaVA mmproj files, which store
num_hidden_layers - 1), and the stored extra block has zero output weights,
so that running it too would change nothing.

from_gguf() reads the two files back into a PyTorch model (used by
refcheck.py, so the reference check can run on shipped files alone).
"""
import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gguf_io as G  # noqa: E402
import vocab as vocab_mod  # noqa: E402
from model import CLIP_MEAN, CLIP_STD, Config, LlavaModel  # noqa: E402

N_CTX_TRAIN = 512


def _np(t):
    return t.detach().cpu().float().numpy()


def text_tensors(model):
    """(GGUF name, torch parameter) pairs of the text model, in llama.cpp's order."""
    out = [("output.weight", model.output.weight), ("output_norm.weight", model.norm.weight),
           ("token_embd.weight", model.tok_embd.weight)]
    for i, b in enumerate(model.blocks):
        p = "blk.%d." % i
        out += [(p + "attn_k.weight", b.wk.weight), (p + "attn_norm.weight", b.attn_norm.weight),
                (p + "attn_output.weight", b.wo.weight), (p + "attn_q.weight", b.wq.weight),
                (p + "attn_v.weight", b.wv.weight), (p + "ffn_down.weight", b.w_down.weight),
                (p + "ffn_gate.weight", b.w_gate.weight), (p + "ffn_norm.weight", b.ffn_norm.weight),
                (p + "ffn_up.weight", b.w_up.weight)]
    return out


def vision_tensors(model):
    """(GGUF name, torch parameter) pairs of the trained vision blocks and projector."""
    v = model.vision
    out = [("mm.0.weight", v.mm0.weight), ("mm.0.bias", v.mm0.bias),
           ("mm.2.weight", v.mm2.weight), ("mm.2.bias", v.mm2.bias),
           ("v.class_embd", v.class_embd), ("v.patch_embd.weight", v.patch_embd.weight),
           ("v.position_embd.weight", v.position_embd), ("v.pre_ln.weight", v.pre_ln.weight),
           ("v.pre_ln.bias", v.pre_ln.bias)]
    for i, b in enumerate(v.blocks):
        out += block_tensors(i, b)
    return out


def block_tensors(i, b):
    p = "v.blk.%d." % i
    return [(p + "attn_k.weight", b.k.weight), (p + "attn_k.bias", b.k.bias),
            (p + "attn_q.weight", b.q.weight), (p + "attn_q.bias", b.q.bias),
            (p + "attn_v.weight", b.v.weight), (p + "attn_v.bias", b.v.bias),
            (p + "attn_out.weight", b.out.weight), (p + "attn_out.bias", b.out.bias),
            (p + "ln1.weight", b.ln1.weight), (p + "ln1.bias", b.ln1.bias),
            (p + "ffn_down.weight", b.fc1.weight), (p + "ffn_down.bias", b.fc1.bias),
            (p + "ffn_up.weight", b.fc2.weight), (p + "ffn_up.bias", b.fc2.bias),
            (p + "ln2.weight", b.ln2.weight), (p + "ln2.bias", b.ln2.bias)]


def _typed(name, a):
    return (name, a, G.GGML_F16 if a.ndim >= 2 else G.GGML_F32)


def export(model, vocab, outdir, name="vlmd-scenes"):
    """Writes outdir/text.gguf and outdir/mmproj.gguf for model and vocab."""
    c = model.c
    os.makedirs(outdir, exist_ok=True)
    hd = c.d_model // c.n_heads
    kv = [
        ("general.architecture", G.string("llama")),
        ("general.name", G.string(name + "-text")),
        ("llama.vocab_size", G.u32(len(vocab))),
        ("llama.context_length", G.u32(N_CTX_TRAIN)),
        ("llama.embedding_length", G.u32(c.d_model)),
        ("llama.block_count", G.u32(c.n_layers)),
        ("llama.feed_forward_length", G.u32(c.d_ff)),
        ("llama.rope.dimension_count", G.u32(hd)),
        ("llama.attention.head_count", G.u32(c.n_heads)),
        ("llama.attention.head_count_kv", G.u32(c.n_kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", G.f32(c.rms_eps)),
        ("llama.rope.freq_base", G.f32(c.rope_theta)),
        ("general.file_type", G.u32(1)),
        ("tokenizer.ggml.model", G.string("llama")),
        ("tokenizer.ggml.pre", G.string("default")),
        ("tokenizer.ggml.tokens", G.arr(G.T_STRING, vocab.tokens)),
        ("tokenizer.ggml.scores", G.arr(G.T_FLOAT32, vocab.scores)),
        ("tokenizer.ggml.token_type", G.arr(G.T_INT32, vocab.types)),
        ("tokenizer.ggml.bos_token_id", G.u32(vocab_mod.BOS)),
        ("tokenizer.ggml.eos_token_id", G.u32(vocab_mod.EOS)),
        ("tokenizer.ggml.unknown_token_id", G.u32(vocab_mod.UNK)),
        ("tokenizer.ggml.add_bos_token", G.boolean(True)),
        ("tokenizer.ggml.add_eos_token", G.boolean(False)),
        ("general.quantization_version", G.u32(2)),
    ]
    G.write_gguf(os.path.join(outdir, "text.gguf"), kv,
                 [_typed(n, _np(p)) for n, p in text_tensors(model)])

    vkv = [
        ("general.architecture", G.string("clip")),
        ("clip.has_text_encoder", G.boolean(False)),
        ("clip.has_vision_encoder", G.boolean(True)),
        ("clip.has_llava_projector", G.boolean(True)),
        ("general.file_type", G.u32(1)),
        ("general.name", G.string(name + "-mmproj")),
        ("general.description", G.string("image encoder for LLaVA")),
        ("clip.projector_type", G.string("mlp")),
        ("clip.vision.image_size", G.u32(c.image_size)),
        ("clip.vision.patch_size", G.u32(c.patch)),
        ("clip.vision.embedding_length", G.u32(c.v_width)),
        ("clip.vision.feed_forward_length", G.u32(c.v_ff)),
        ("clip.vision.projection_dim", G.u32(c.d_model)),
        ("clip.vision.attention.head_count", G.u32(c.v_heads)),
        ("clip.vision.attention.layer_norm_epsilon", G.f32(c.ln_eps)),
        ("clip.vision.block_count", G.u32(c.v_layers + 1)),
        ("clip.vision.image_mean", G.arr(G.T_FLOAT32, CLIP_MEAN)),
        ("clip.vision.image_std", G.arr(G.T_FLOAT32, CLIP_STD)),
        ("clip.use_gelu", G.boolean(False)),
    ]
    tensors = [_typed(n, _np(p)) for n, p in vision_tensors(model)]
    # The stored-but-not-run last block: an exact identity.
    W, FF = c.v_width, c.v_ff
    p = "v.blk.%d." % c.v_layers
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    for nm in ("attn_k", "attn_q", "attn_v", "attn_out"):
        tensors += [_typed(p + nm + ".weight", z(W, W)), _typed(p + nm + ".bias", z(W))]
    tensors += [_typed(p + "ln1.weight", np.ones(W, np.float32)), _typed(p + "ln1.bias", z(W)),
                _typed(p + "ffn_down.weight", z(FF, W)), _typed(p + "ffn_down.bias", z(FF)),
                _typed(p + "ffn_up.weight", z(W, FF)), _typed(p + "ffn_up.bias", z(W)),
                _typed(p + "ln2.weight", np.ones(W, np.float32)), _typed(p + "ln2.bias", z(W))]
    G.write_gguf(os.path.join(outdir, "mmproj.gguf"), vkv, tensors)


def from_gguf(text_path, mmproj_path):
    """(LlavaModel with the files' weights (as f32), Vocab) of an exported pair."""
    t = G.GGUFFile(text_path)
    m = G.GGUFFile(mmproj_path)
    k, mk = t.kv, m.kv
    c = Config(image_size=mk["clip.vision.image_size"], patch=mk["clip.vision.patch_size"],
               v_width=mk["clip.vision.embedding_length"], v_layers=mk["clip.vision.block_count"] - 1,
               v_heads=mk["clip.vision.attention.head_count"], v_ff=mk["clip.vision.feed_forward_length"],
               d_model=k["llama.embedding_length"], n_layers=k["llama.block_count"],
               n_heads=k["llama.attention.head_count"], n_kv_heads=k["llama.attention.head_count_kv"],
               d_ff=k["llama.feed_forward_length"], n_vocab=len(k["tokenizer.ggml.tokens"]),
               rope_theta=k["llama.rope.freq_base"], rms_eps=k["llama.attention.layer_norm_rms_epsilon"],
               ln_eps=mk["clip.vision.attention.layer_norm_epsilon"])
    model = LlavaModel(c)
    with torch.no_grad():
        for name, p in text_tensors(model):
            p.copy_(torch.from_numpy(t.tensor(name)).view_as(p))
        for name, p in vision_tensors(model):
            p.copy_(torch.from_numpy(m.tensor(name)).view_as(p))
    model.eval()
    v = vocab_mod.Vocab(k["tokenizer.ggml.tokens"], k["tokenizer.ggml.scores"],
                        k["tokenizer.ggml.token_type"])
    return model, v


def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a checkpoint as text.gguf + mmproj.gguf (F16).")
    ap.add_argument("checkpoint")
    ap.add_argument("outdir")
    ap.add_argument("--name", default="vlmd-scenes")
    a = ap.parse_args(argv)
    from evaluate import load_checkpoint
    model, v, ck = load_checkpoint(a.checkpoint)
    export(model, v, a.outdir, a.name)
    for f in ("text.gguf", "mmproj.gguf"):
        path = os.path.join(a.outdir, f)
        print("%s: %.2f MB" % (path, os.path.getsize(path) / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
