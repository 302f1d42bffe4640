"""tools/train/model.py - a small LLaVA-1.5 in PyTorch, computing exactly
what the C engine (and llama.cpp's llava-cli) computes on the exported files.

  image [B][3][S][S] (normalised with CLIP's mean/std)
    -> CLIP ViT: conv patch embedding (no bias), class token, learned
       positions, pre-LN (`v.pre_ln`), `v_layers` pre-norm blocks (biased
       q/k/v/out, quick-GELU MLP), NO post-LN
    -> drop the class token -> mm.0 -> GELU (tanh) -> mm.2
    -> image rows [B][n_patches][d_model]
  text: token embeddings; image rows go in as layer-0 inputs unscaled
    -> LLaMA decoder: RMSNorm, RoPE in llama.cpp "normal" mode (rotating the
       adjacent pairs x[2i], x[2i+1]), GQA, causal softmax attention,
       SwiGLU FFN -> final RMSNorm -> output
The export writes v_layers + 1 vision blocks (clip.vision.block_count =
v_layers + 1): llama.cpp runs block_count - 1 of them, as for a real LLaVA
mmproj, and the extra block is an exact identity (zero output weights).

`emulate=True` (or "all"; reference check only) rounds like ggml's CPU
backend on a file with F16 weights: activations to f16 before every matmul
(and the pixel values before the patch embedding), K/V to f16 (the KV
cache), Q to f16 for K*Q, the softmax probabilities to f16 for V*P in the
text model, and the GELU / quick-GELU through f16 as ggml's tables do.
emulate="kv" does all but the matmul-input rounding (what ggml does with
F32 weights).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Config:
    image_size: int = 60
    patch: int = 10
    v_width: int = 128
    v_layers: int = 3          # blocks that are run (the file stores one more)
    v_heads: int = 4
    v_ff: int = 512
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 3
    d_ff: int = 512
    n_vocab: int = 630
    n_ctx: int = 256
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    ln_eps: float = 1e-5
    aux_head: bool = False     # training-only per-cell attribute head (never exported)

    @property
    def n_patches(self):
        return (self.image_size // self.patch) ** 2

    def to_dict(self):
        return asdict(self)


# ==== ggml rounding helpers ================================================

def f16(x):
    """x rounded to float16 and back (round to nearest even, as ggml)."""
    return x.half().float()


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x * (1.0 + 0.044715 * x * x)))


def gelu_ggml(x, emulate):
    """ggml_gelu: tanh approximation; through the f16 table when emulating
    (x <= -10 -> 0, x >= 10 -> x, else f16(gelu(f16(x))))."""
    if not emulate:
        return gelu_tanh(x)
    y = f16(gelu_tanh(f16(x)))
    y = torch.where(x <= -10.0, torch.zeros_like(x), y)
    return torch.where(x >= 10.0, x, y)


def quick_gelu(x, emulate):
    """x * sigmoid(1.702 x); f16(qgelu(f16(x))) when emulating."""
    if not emulate:
        return x * torch.sigmoid(1.702 * x)
    h = f16(x)
    return f16(h * torch.sigmoid(1.702 * h))


class Linear(nn.Linear):
    """nn.Linear whose input is rounded to f16 when emulating ggml."""

    def forward(self, x, emulate=False):
        return F.linear(f16(x) if emulate is True or emulate == "all" else x, self.weight, self.bias)


# ==== Vision encoder + projector ==========================================

class VisionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.ln1 = nn.LayerNorm(c.v_width, eps=c.ln_eps)
        self.q = Linear(c.v_width, c.v_width)
        self.k = Linear(c.v_width, c.v_width)
        self.v = Linear(c.v_width, c.v_width)
        self.out = Linear(c.v_width, c.v_width)
        self.ln2 = nn.LayerNorm(c.v_width, eps=c.ln_eps)
        self.fc1 = Linear(c.v_width, c.v_ff)   # exported as ffn_down (llama.cpp's naming)
        self.fc2 = Linear(c.v_ff, c.v_width)   # exported as ffn_up

    def forward(self, x, emulate=False):
        B, T, W = x.shape                       # x: [B][T = 1 + n_patches][v_width]
        H = self.c.v_heads
        hd = W // H
        h = self.ln1(x)
        q = self.q(h, emulate).view(B, T, H, hd).transpose(1, 2) / math.sqrt(hd)
        k = self.k(h, emulate).view(B, T, H, hd).transpose(1, 2)
        v = self.v(h, emulate).view(B, T, H, hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)   # [B][H][T][T]
        o = (att @ v).transpose(1, 2).reshape(B, T, W)
        x = x + self.out(o, emulate)
        h = self.ln2(x)
        return x + self.fc2(quick_gelu(self.fc1(h, emulate), emulate), emulate)


class Vision(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.patch_embd = nn.Conv2d(3, c.v_width, c.patch, stride=c.patch, bias=False)
        self.class_embd = nn.Parameter(torch.randn(c.v_width) * 0.02)
        self.position_embd = nn.Parameter(torch.randn(1 + c.n_patches, c.v_width) * 0.02)
        self.pre_ln = nn.LayerNorm(c.v_width, eps=c.ln_eps)
        self.blocks = nn.ModuleList([VisionBlock(c) for _ in range(c.v_layers)])
        self.mm0 = Linear(c.v_width, c.d_model)
        self.mm2 = Linear(c.d_model, c.d_model)

    def forward(self, img, emulate=False):
        """img: [B][3][S][S] normalised pixels -> [B][n_patches][d_model]."""
        return self.project(self.features(img, emulate), emulate)

    def project(self, x, emulate=False):
        """ViT features [B][n_patches][v_width] -> image rows [B][n_patches][d_model]."""
        return self.mm2(gelu_ggml(self.mm0(x, emulate), emulate), emulate)

    def features(self, img, emulate=False):
        """The ViT output without the class token: [B][n_patches][v_width]."""
        if emulate is True or emulate == "all":
            img = f16(img)
        x = self.patch_embd(img)                            # [B][W][S/p][S/p]
        x = x.flatten(2).transpose(1, 2)                    # [B][n_patches][W], raster order
        cls = self.class_embd.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embd
        x = self.pre_ln(x)
        for blk in self.blocks:
            x = blk(x, emulate)
        return x[:, 1:]


# ==== LLaMA decoder =======================================================

class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, theta):
    """llama.cpp "normal" RoPE: x [B][H][T][hd], pos [B][T] (int). Pair
    (x[2i], x[2i+1]) turns by pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64, device=x.device) / hd)
    ang = (pos.to(torch.float64)[..., None] * inv).to(x.dtype)   # [B][T][hd/2]
    cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]  # [B][1][T][hd/2]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class DecoderBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        hd = c.d_model // c.n_heads
        self.attn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.wq = Linear(c.d_model, c.n_heads * hd, bias=False)
        self.wk = Linear(c.d_model, c.n_kv_heads * hd, bias=False)
        self.wv = Linear(c.d_model, c.n_kv_heads * hd, bias=False)
        self.wo = Linear(c.n_heads * hd, c.d_model, bias=False)
        self.ffn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.w_gate = Linear(c.d_model, c.d_ff, bias=False)
        self.w_up = Linear(c.d_model, c.d_ff, bias=False)
        self.w_down = Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x, pos, past, key_mask, emulate, past_index=None):
        """x [B][T][d]; pos [B][T]; past None or (k, v) each [Bp][n_kv][Tp][hd]
        where Bp is B, or 1 (shared by all rows), or anything when
        past_index [B] says which past row each row continues; key_mask None
        or bool [B][Tp+T] (False = never attend). Returns (x, (k, v)) with
        the keys/values of all Tp+T positions."""
        c = self.c
        B, T, _ = x.shape
        H, KV = c.n_heads, c.n_kv_heads
        hd = c.d_model // H
        h = self.attn_norm(x)
        q = self.wq(h, emulate).view(B, T, H, hd).transpose(1, 2)
        k = self.wk(h, emulate).view(B, T, KV, hd).transpose(1, 2)
        v = self.wv(h, emulate).view(B, T, KV, hd).transpose(1, 2)
        q = rope(q, pos, c.rope_theta)
        k = rope(k, pos, c.rope_theta)
        if emulate:                        # the F16 KV cache, f16 Q for K*Q
            k, v, q = f16(k), f16(v), f16(q)
        if past is not None:
            pk, pv = past
            if past_index is not None:
                pk, pv = pk.index_select(0, past_index), pv.index_select(0, past_index)
            elif pk.shape[0] != B:
                pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
            k = torch.cat([pk, k], dim=2)
            v = torch.cat([pv, v], dim=2)
        new_past = (k, v)
        Tk = k.shape[2]
        rep = H // KV
        kk = k.repeat_interleave(rep, dim=1)       # query head h uses KV head h // rep
        vv = v.repeat_interleave(rep, dim=1)
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(hd)   # [B][H][T][Tk]
        qi = torch.arange(T, device=x.device)[:, None] + (Tk - T)
        kj = torch.arange(Tk, device=x.device)[None, :]
        allowed = (kj <= qi)[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if emulate:
            p = f16(p)
        o = (p @ vv).transpose(1, 2).reshape(B, T, H * hd)
        x = x + self.wo(o, emulate)
        h = self.ffn_norm(x)
        g = self.w_gate(h, emulate)
        x = x + self.w_down(F.silu(g) * self.w_up(h, emulate), emulate)
        return x, new_past


class AuxHead(nn.Module):
    """Training-only: from the ViT features pooled over each cell of the
    3x3 grid, logits for the cell's shape, colour and size (class 0 =
    empty). Its loss teaches the encoder what a cell holds directly, which
    the caption loss alone does slowly; it is not part of the exported
    model and does not change what the exported model computes."""

    def __init__(self, c, n_shapes, n_colors, n_sizes):
        super().__init__()
        self.c = c
        self.sizes = (n_shapes + 1, n_colors + 1, n_sizes + 1)
        self.lin = nn.Linear(c.v_width, sum(self.sizes))

    def forward(self, feats):
        """feats [B][n_patches][W] -> three logit tensors [B][9][n_class]."""
        B, N, W = feats.shape
        g = self.c.image_size // self.c.patch
        f = feats.transpose(1, 2).reshape(B, W, g, g)
        f = F.adaptive_avg_pool2d(f, 3).flatten(2).transpose(1, 2)     # [B][9][W]
        return torch.split(self.lin(f), self.sizes, dim=-1)


class LlavaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.vision = Vision(c)
        self.aux = AuxHead(c, 5, 8, 2) if c.aux_head else None
        self.tok_embd = nn.Embedding(c.n_vocab, c.d_model)
        self.blocks = nn.ModuleList([DecoderBlock(c) for _ in range(c.n_layers)])
        self.norm = RMSNorm(c.d_model, c.rms_eps)
        self.output = Linear(c.d_model, c.n_vocab, bias=False)
        self._init()

    def _init(self):
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        # Residual projections start small (GPT-2 style).
        for blk in self.blocks:
            for lin in (blk.wo, blk.w_down):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.c.n_layers))
        for blk in self.vision.blocks:
            for lin in (blk.out, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.c.v_layers))

    def n_params(self):
        """Parameters of the model as exported (the auxiliary head is not)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("aux."))

    def decode(self, x, pos, past=None, key_mask=None, emulate=False, past_index=None):
        """Runs the decoder layers on input rows x [B][T][d] at positions pos
        [B][T]. past: None or a list of per-layer (k, v) (see
        DecoderBlock.forward for past_index). Returns (the final normed
        hidden states [B][T][d], the new per-layer (k, v) list)."""
        new = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, pos, None if past is None else past[i], key_mask, emulate, past_index)
            new.append(kv)
        return self.norm(x), new

    def logits(self, h, emulate=False):
        return self.output(h, emulate)
