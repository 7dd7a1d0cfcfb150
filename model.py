"""The minWM DiT: Wan2.1's transformer written out by hand, plus PRoPE cameras and three attention modes.

Read top to bottom:
  1. ModelConfig and PRESETS ("tiny" = the embedded procedural world, "wan2.1-t2v-1.3b" = the real model)
  2. small pieces: sinusoidal time embedding, Wan's 3D RoPE (interleaved pairs), LayerNorm in fp32
  3. the attention function and the three modes (README, Design notes):
       bidirectional  - every token sees every token (Phase 1, DMD's real and fake scores)
       teacher forcing - the sequence [clean F frames | noisy F frames] under a block-causal mask (Stage 1-2)
       cached rollout  - a chunk attends to a preallocated per-layer KV cache (sink + local window) (infer, DMD)
  4. the Wan block (adaLN-zero style 6-way modulation, self-attn + cross-attn + FFN) and the DiT
  5. the flow-matching schedule and the samplers (bidirectional Euler, chunked AR rollout)
  6. checkpoint loading: Wan original / diffusers layouts, shards, minWM checkpoints, CausVid-lineage .pt;
     HunyuanVideo-1.5 / HY-WorldPlay files go to the MMDiT in mmdit.py (the second backbone, which
     imports the attention, cache, RoPE, PRoPE and schedule from here)

Parameter names follow the ORIGINAL Wan layout (`blocks.0.self_attn.q.weight`), so Wan, CausVid,
Self-Forcing and minWM checkpoints load without renaming; diffusers names are converted on load.
"""
import functools
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

import prope


# ----------------------------------------------------------------------------------------------
# 1. config


@dataclass
class ModelConfig:
    dim: int = 128
    ffn_dim: int = 512
    num_heads: int = 2
    num_layers: int = 4
    in_channels: int = 25  # = out_channels (+ out_channels + 1 with image_cond: noisy | cond latent | mask)
    out_channels: int = 12  # channels of the latents x
    patch_size: tuple = (1, 2, 2)
    text_dim: int = 64
    freq_dim: int = 64
    eps: float = 1e-6
    cross_attn_norm: bool = True  # LayerNorm with affine before cross-attention (Wan's norm3)
    rope_theta: float = 10000.0
    image_cond: bool = True  # TI2V: channel-concat a condition latent and a mask
    prope: str = "inline"  # "none" | "branch" (parallel attention, zero-init proj) | "inline" (GTA)
    prope_dim: int = 0  # inline only: channels per head under the projective transform (0 = head_dim // 2)
    chunk: int = 2  # latent frames per AR chunk
    # the context convention of a causal model (GameNGen's augmentation against drift in long rollouts):
    context_noise: float = 0.0  # teacher forcing: context chunks (not frame 0) noised to sigma ~ U(0, this)
    context_sigma: float = 0.0  # rollout: each generated chunk enters the KV cache noised to this sigma

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.prope not in ("none", "branch", "inline"):
            raise ValueError(f"ModelConfig.prope must be none|branch|inline, got {self.prope!r}")
        want = 2 * self.out_channels + 1 if self.image_cond else self.out_channels
        if self.in_channels != want:
            raise ValueError(f"ModelConfig: in_channels {self.in_channels} != {want} "
                             f"(out_channels {self.out_channels}, image_cond {self.image_cond})")
        if self.prope == "inline":
            pd = self.inline_prope_dim
            if pd % 4 or not 0 < pd < self.head_dim or (self.head_dim - pd) % 2:
                raise ValueError(f"ModelConfig.prope_dim {pd} must be a multiple of 4 inside head_dim {self.head_dim}")
        elif self.prope == "branch" and self.head_dim % 4:
            raise ValueError(f"ModelConfig: PRoPE needs head_dim % 4 == 0, got {self.head_dim}")

    @property
    def head_dim(self):
        return self.dim // self.num_heads

    @property
    def inline_prope_dim(self):
        return (self.prope_dim or self.head_dim // 2) if self.prope == "inline" else 0


PRESETS = {
    # The embedded world: 32x32 frames -> pixel codec x2 -> 12 x 16 x 16 latents -> 8 x 8 tokens per frame.
    "tiny": dict(),
    # the same world with a renderer ~3x larger (LONG_ROLLOUTS.md, "What the model's memory is worth": what the
    # tiny model draws from a perfect memory is the larger part of its long-rollout colour error); 3 heads keep
    # head_dim 64 (inline PRoPE: 32 + 32)
    "small": dict(dim=192, ffn_dim=768, num_heads=3, num_layers=6),
    "wan2.1-t2v-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_channels=16,
                            out_channels=16, patch_size=(1, 2, 2), text_dim=4096, freq_dim=256, eps=1e-6,
                            image_cond=False, prope="none", chunk=4),
}


def make_config(preset="tiny", **overrides):
    """A preset's config: a ModelConfig here, or an mmdit.MMDiTConfig for the MMDiT presets (mmdit.py)."""
    import mmdit  # a sibling that imports this file, hence imported late
    if preset in mmdit.PRESETS:
        return mmdit.make_config(preset, **overrides)
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS) + sorted(mmdit.PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})


def build(cfg):
    """The network a config describes: the Wan DiT, or the MMDiT for an mmdit.MMDiTConfig."""
    import mmdit
    return mmdit.MMDiT(cfg) if isinstance(cfg, mmdit.MMDiTConfig) else DiT(cfg)


# ----------------------------------------------------------------------------------------------
# 2. small pieces


def sinusoidal(t, dim):
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half). t: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1).float()


def rope_split(d):
    """Wan's split of d rotary channels into (t, h, w): h = w = 2*(d//6), t = the rest (44/42/42 for 128)."""
    h = 2 * (d // 6)
    return d - 2 * h, h, h


def rope_tables(d, frames, h, w, theta, device, split=None):
    """cos, sin of 3D RoPE for the token grid (frames x h x w); frames: (F,) absolute frame positions.

    split: channels per axis (t, h, w), default Wan's rope_split(d) (the MMDiT passes HY's 16/56/56).
    Returns two (F*h*w, d//2) tensors: one angle per interleaved channel pair.
    """
    parts = []
    for dim_i, pos in zip(split or rope_split(d), (frames.double(), torch.arange(h, device=device).double(),
                                          torch.arange(w, device=device).double())):
        inv = 1.0 / theta ** (torch.arange(0, dim_i, 2, dtype=torch.float64, device=device) / dim_i)
        parts.append(torch.outer(pos, inv))  # (n, dim_i // 2)
    F_ = len(frames)
    ang = torch.cat([parts[0][:, None, None].expand(F_, h, w, -1), parts[1][None, :, None].expand(F_, h, w, -1),
                     parts[2][None, None, :].expand(F_, h, w, -1)], -1).reshape(F_ * h * w, -1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]). x: (B, H, N, d); cos, sin: (N, d//2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, N, d//2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    return out.to(x.dtype)


def layer_norm(x, eps, weight=None, bias=None):
    """Wan runs its LayerNorms in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """Wan's q/k RMSNorm (the weights' names and values are nn.RMSNorm's). The weight is cast to the input's dtype:
    under bf16 autocast (training on a GPU) the input is bf16 and the master weight fp32, and torch's fused kernel
    refuses mixed dtypes ("cannot dispatch to fused implementation") and runs an unfused fallback."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def modulate(x, shift, scale, frames):
    """x (B, N, D) with N = frames * tokens; shift/scale (B, Ft, D) with Ft = 1 or frames, in fp32.
    Computed in fp32 (as Wan does), returned in x's dtype for the next (maybe bf16) linear layer."""
    B, N, D = x.shape
    Ft = shift.shape[1]
    y = x.view(B, Ft, N // Ft, D).float() * (1 + scale[:, :, None]) + shift[:, :, None]
    return y.view(B, N, D).to(x.dtype)


def gated_residual(x, y, g):
    """x + y * g in fp32, back in the residual stream's dtype; y (B, N, D), g (B, Ft, D)."""
    B, N, D = y.shape
    return (x.float() + (y.float().view(B, g.shape[1], -1, D) * g[:, :, None]).view(B, N, D)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# 3. attention: one function, three callers


def attention(q, k, v, mask=None):
    """q (B, H, Nq, D), k/v (B, H, Nk, D); mask: None, a bool (Nq, Nk) tensor (True = may attend), or
    a flex_attention BlockMask (teacher forcing at scale: only the blocks that attend are computed)."""
    if isinstance(mask, BlockMask):
        return _flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _flex_attention(q, k, v, block_mask):
    # compiled on CUDA (the fused kernel); eager elsewhere (the CPU test path: correct, slow)
    global _FLEX
    if q.is_cuda and _FLEX is flex_attention:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return (_FLEX if q.is_cuda else flex_attention)(q, k, v, block_mask=block_mask)


_FLEX = flex_attention


def teacher_forcing_mask(frames, chunk, tokens_per_frame, device=None, sink=0, window=None):
    """Block-causal mask over [clean (frames) | noisy (frames)] tokens (Stage 1, teacher forcing).

    A clean token in chunk i sees clean chunks <= i; a noisy token in chunk i sees clean chunks < i
    and its own noisy chunk. With a window, earlier frames are seen only if they are among the
    `window` frames before chunk i or among the first `sink` frames: exactly what a rollout through
    KVCache(sink, window) attends to. Returns bool (2N, 2N), N = frames * tokens_per_frame.
    """
    f = torch.arange(frames, device=device)
    c = f // chunk  # chunk id of each frame
    qi, kj = c[:, None], c[None, :]
    before = kj < qi
    if window is not None:  # earlier frames only within the window before the chunk's start, or sinks
        before = before & ((f[None, :] >= c[:, None] * chunk - window) | (f[None, :] < sink))
    same = kj == qi
    top = torch.cat([before | same, torch.zeros_like(same)], 1)  # clean rows
    bottom = torch.cat([before, same], 1)  # noisy rows
    m = torch.cat([top, bottom], 0)  # (2F, 2F) at frame level
    return m.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


@functools.lru_cache(maxsize=16)
def teacher_forcing_block_mask(frames, chunk, tokens_per_frame, device, sink=0, window=None):
    """teacher_forcing_mask as a flex_attention BlockMask, built once per shape: the dense (2N)^2 mask
    of 21 Wan frames (65,520 tokens) would be 4 GB and the attention over it not fused."""
    def mask_mod(b, h, q, k):
        qf, kf = q // tokens_per_frame, k // tokens_per_frame  # frame in [0, 2 frames): clean, then noisy
        q_noisy, k_noisy = qf >= frames, kf >= frames
        qc, kf = (qf % frames) // chunk, kf % frames
        kc = kf // chunk
        before = kc < qc
        if window is not None:
            before = before & ((kf >= qc * chunk - window) | (kf < sink))
        same = kc == qc
        return (~q_noisy & ~k_noisy & (before | same)) | (q_noisy & ((~k_noisy & before) | (k_noisy & same)))
    n = 2 * frames * tokens_per_frame
    return create_block_mask(mask_mod, None, None, n, n, device=device)


# the streaming cache of infer.py and the long-rollout metric: latent frames kept as sink and as the recent window.
# A sink of 2 keeps frame 0 and the first generated frame (the tiny model's whole first chunk): with it a long
# rollout of the shipped dmd keeps its colours better than with frame 0 alone (LONG_ROLLOUTS.md, "The sink of 2
# is now the streaming default"), although the chain trained with TRAIN_SINK
STREAM_SINK, STREAM_WINDOW = 2, 8
TRAIN_SINK = 1  # Stage 1's teacher forcing and Stage 3's self-rollouts keep frame 0 alone (the shipped chain's recipe)


class KVCache:
    """Per-layer preallocated keys/values for a chunk-by-chunk rollout (attention mode 3, the rollout).

    Slots, in latent frames: [sink | window (a ring) | scratch (one chunk)]. Keys are stored after
    RoPE (absolute positions) and after PRoPE, so nothing in the cache is recomputed, and the order
    of keys in the buffer does not matter to attention. Frames are committed in order, so the filled
    slots are always a prefix of [sink | window]; the chunk being denoised writes its K/V right after
    that prefix (into the scratch once the ring is full) and attends to one contiguous view: the
    filled prefix and itself. No mask, SDPA's fused path, and a cost that grows with what the cache
    holds, not with its capacity. The final t = 0 pass (`commit=True`) makes the chunk context for
    the next ones; once the ring is full its frames replace the oldest ones, after that pass has
    attended to them (`advance`). Memory stays flat however long the rollout; no host-device sync.
    """

    def __init__(self, cfg, batch, tokens_per_frame, sink=TRAIN_SINK, window=64, chunk=None, device=None,
                 dtype=torch.float32):
        self.tpf, self.sink, self.window, self.chunk = tokens_per_frame, sink, window, chunk or cfg.chunk
        self.slots = sink + window + self.chunk  # in frames
        n, heads = self.layout(cfg)
        shape = (batch, heads, self.slots * tokens_per_frame, cfg.head_dim)
        self.kv = [[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)] for _ in range(cfg.num_layers)]
        self.text = [None] * cfg.num_layers  # (context, (k, v)) of each layer's cross-attention (DiT.text_kv)
        self.filled = 0  # frames in the [sink | window] prefix
        self.frames_written = 0  # absolute index of the next frame to commit
        self.at = 0  # the slot (frame) where the chunk of the current forward sits

    @staticmethod
    def layout(cfg):
        """(tensors per layer, heads): k and v; the PRoPE branch's k and v ride along as H more heads."""
        return 2, cfg.num_heads * (2 if cfg.prope == "branch" else 1)

    def reset(self):
        """Empty the cache for a new rollout, keeping its memory."""
        self.text = [None] * len(self.text)
        self.filled = self.frames_written = self.at = 0

    def slot_of(self, frame):
        return frame if frame < self.sink else self.sink + (frame - self.sink) % self.window

    def attend(self, layer, new, n_frames, commit):
        """Put the chunk's tensors `new` (each (B, H, n_frames * tpf, D)) after the filled prefix;
        return [(B, H, S, D)] over the prefix and the chunk, and the mask (always None)."""
        bufs, held = self.kv[layer], self.filled * self.tpf
        if torch.is_grad_enabled() and new[0].requires_grad:
            # a forward that trains (DMD's exit step): concatenate instead of writing in place, since
            # later in-place cache writes would invalidate tensors autograd saved for the backward
            if commit:
                raise ValueError("KVCache: commit the clean chunk under torch.no_grad()")
            return [torch.cat([buf[:, :, :held], x], 2) for buf, x in zip(bufs, new)], None
        # while the ring has room the chunk sits in its own slots for good; otherwise in the scratch
        self.at = self.filled if self.filled + n_frames <= self.sink + self.window else self.sink + self.window
        s, n = self.at * self.tpf, n_frames * self.tpf
        for buf, x in zip(bufs, new):
            buf[:, :, s:s + n] = x
        if self.at != self.filled:  # the one chunk overflowing a ring not yet full: prefix and chunk apart
            return [torch.cat([buf[:, :, :held], x], 2) for buf, x in zip(bufs, new)], None
        return [buf[:, :, :s + n] for buf in bufs], None

    def advance(self, n_frames):
        """After a commit pass: the chunk's frames become context (copied from where they sat into
        their ring slots, evicting the oldest frames of a full ring)."""
        for f in range(n_frames):
            slot = self.slot_of(self.frames_written + f)
            if slot != self.at + f:
                s, src = slot * self.tpf, (self.at + f) * self.tpf
                for bufs in self.kv:
                    for buf in bufs:
                        buf[:, :, s:s + self.tpf] = buf[:, :, src:src + self.tpf]
        self.filled = min(self.filled + n_frames, self.sink + self.window)
        self.frames_written += n_frames


def zero_linear(d):
    """nn.Linear(d, d) at zero: the PRoPE branch's output projection, a path that adds nothing until trained."""
    lin = nn.Linear(d, d)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class SelfAttention(nn.Module):
    PROPE_PROJ = "prope_proj"  # where the PRoPE branch's output projection lives (enable_prope_branch)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d, eps=cfg.eps), RMSNorm(d, eps=cfg.eps)  # across heads
        if cfg.prope == "branch":
            self.prope_proj = zero_linear(d)  # at step 0 the fine-tuned model == the base model

    def forward(self, x, pos, layer=0):
        # x: (B, N, dim); pos: per-forward geometry (rope tables, PRoPE matrices, mask, cache)
        B, N, _ = x.shape
        H, D, pd = self.cfg.num_heads, self.cfg.head_dim, self.cfg.inline_prope_dim
        split = lambda t: t.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        q, k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(x))), split(self.v(x))
        cams = pos["cams"]  # (P, P_inv), each (B, F, 4, 4), or None
        if pd and cams is not None:  # inline: channels [:pd] projective, [pd:] RoPE (GTA form)
            P, Pi = cams
            qr = torch.cat([prope.apply(q[..., :pd], P.mT), apply_rope(q[..., pd:], *pos["rope"])], -1)
            kr = torch.cat([prope.apply(k[..., :pd], Pi), apply_rope(k[..., pd:], *pos["rope"])], -1)
            vr = torch.cat([prope.apply(v[..., :pd], Pi), v[..., pd:]], -1)
        elif pd:  # inline model run without cameras: projective channels stay untransformed
            qr = torch.cat([q[..., :pd], apply_rope(q[..., pd:], *pos["rope"])], -1)
            kr = torch.cat([k[..., :pd], apply_rope(k[..., pd:], *pos["rope"])], -1)
            vr = v
        else:
            qr, kr, vr = apply_rope(q, *pos["rope"]), apply_rope(k, *pos["rope"]), v
        branch = self.cfg.prope == "branch"
        if branch and cams is not None:
            # the parallel attention on the pre-RoPE q, k, v under the full projective transform, as H more
            # heads of the same call: one fused kernel instead of two (bench.py --preset: the two side by side)
            P, Pi = cams
            qr, kr, vr = (torch.cat(pair, 1) for pair in ((qr, prope.apply(q, P.mT)), (kr, prope.apply(k, Pi)),
                                                          (vr, prope.apply(v, Pi))))  # (B, 2H, N, D)
        elif branch and pos["cache"] is not None:  # no cameras: zero branch heads keep the cache's 2H layout
            qr, kr, vr = (torch.cat([t, torch.zeros_like(t)], 1) for t in (qr, kr, vr))
        new, mask = [kr, vr], pos["mask"]
        if pos["cache"] is not None:
            new, mask = pos["cache"].attend(layer, new, pos["n_frames"], pos["commit"])
        o = attention(qr, new[0], new[1], mask)  # (B, H, N, D); (B, 2H, N, D) with the branch
        if pd and cams is not None:
            o = torch.cat([prope.apply(o[..., :pd], cams[0]), o[..., pd:]], -1)
        out = self.o(o[:, :H].transpose(1, 2).reshape(B, N, -1))
        if branch and cams is not None:
            ob = prope.apply(o[:, H:], cams[0])
            out = out + self.prope_proj(ob.transpose(1, 2).reshape(B, N, -1))
        return out


class CrossAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.H = cfg.dim, cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d, eps=cfg.eps), RMSNorm(d, eps=cfg.eps)

    def text_kv(self, context):
        """context (B, L, dim) -> k, v (B, H, L, head_dim): the same for every chunk and step of a rollout."""
        split = lambda t: t.view(t.shape[0], t.shape[1], self.H, -1).transpose(1, 2)
        return split(self.norm_k(self.k(context))), split(self.v(context))

    def forward(self, x, kv):  # x (B, N, dim), kv from text_kv
        B, N, d = x.shape
        q = self.norm_q(self.q(x)).view(B, N, self.H, -1).transpose(1, 2)
        return self.o(attention(q, *kv).transpose(1, 2).reshape(B, N, d))


# ----------------------------------------------------------------------------------------------
# 4. the Wan block and the DiT


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, text_kv, pos, layer):
        # x (B, N, dim); e (B, Ft, 6, dim) from the time projection; text_kv: this layer's text k, v
        shift, scale, g, c_shift, c_scale, c_g = (self.modulation.float()[:, None] + e.float()).unbind(2)
        F_ = pos["n_frames"]
        y = self.self_attn(modulate(layer_norm(x, self.eps), shift, scale, F_), pos, layer)
        x = gated_residual(x, y, g)
        n3 = self.norm3
        xn = layer_norm(x, self.eps, n3.weight, n3.bias) if isinstance(n3, nn.LayerNorm) else x
        x = x + self.cross_attn(xn, text_kv)
        y = self.ffn(modulate(layer_norm(x, self.eps), c_shift, c_scale, F_))
        return gated_residual(x, y, c_g)


class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, temb, frames):  # temb (B, Ft, dim)
        shift, scale = (self.modulation.float()[:, None] + temb.float()[:, :, None]).unbind(2)
        return self.head(modulate(layer_norm(x, self.eps), shift, scale, frames))


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.grad_ckpt = False  # activation checkpointing per block while training (--grad_ckpt)
        self.flex = None  # teacher forcing with a flex_attention BlockMask: None = on CUDA, else the dense mask

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -- input checks: one-line ValueErrors instead of deep torch tracebacks
    def _check(self, x, t, context, cameras, cond):
        cfg = self.cfg
        if x.ndim != 5:
            raise ValueError(f"DiT: x must be (B, C, F, H, W), got shape {tuple(x.shape)}")
        B, C, F_, H, W = x.shape
        if C != cfg.out_channels:
            raise ValueError(f"DiT: x has {C} latent channels, the model expects {cfg.out_channels}")
        pt, ph, pw = cfg.patch_size
        if F_ % pt or H % ph or W % pw:
            raise ValueError(f"DiT: latent size (F={F_}, H={H}, W={W}) is not divisible by the patch {cfg.patch_size}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
            raise ValueError(f"DiT: context must be (B={B}, L, {cfg.text_dim}), got {tuple(context.shape)}")
        if t.shape not in ((B,), (B, F_ // pt)):
            raise ValueError(f"DiT: t must be (B,) or (B, F) = ({B}, {F_ // pt}), got {tuple(t.shape)}")
        if cameras is not None and cameras.w2c.shape[:2] != (B, F_ // pt):
            raise ValueError(f"DiT: cameras cover {tuple(cameras.w2c.shape[:2])} (B, F), x has ({B}, {F_ // pt})")
        if cond is not None and cond.shape != (B, cfg.in_channels - C, F_, H, W):
            raise ValueError(f"DiT: cond must be {(B, cfg.in_channels - C, F_, H, W)}, got {tuple(cond.shape)}")

    def embed(self, x, cond):
        """(B, C, F, H, W) -> tokens (B, F*h*w, dim), frame-major."""
        if self.cfg.image_cond:
            if cond is None:
                cond = x.new_zeros(x.shape[0], self.cfg.in_channels - x.shape[1], *x.shape[2:])
            x = torch.cat([x, cond.to(x.dtype)], 1)
        return self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)

    def forward(self, x, t, context, cameras=None, cond=None, *, clean=None, clean_t=None, cache=None, commit=False,
                frame_offset=0, sink=0, window=None):
        """Predict the flow-matching velocity v = noise - x0 (same shape as x).

        x: (B, C, F, H, W) latents; t: (B,) or per-frame (B, F) on the 0..1000 scale;
        context: (B, L, text_dim) text embeddings (padding them is the caller's job);
        cameras: prope.Cameras of the F frames; cond: (B, in_channels - C, F, H, W) or None (zeros).
        Modes: default bidirectional; `clean=` (B, C, F, H, W) -> teacher forcing over [clean | x] with
        the block-causal mask (limited to `sink` + `window` earlier frames when window is given, as a
        rollout through KVCache(sink, window) sees them), returns the prediction for x; `cache=` a
        KVCache -> x is the chunk that starts at absolute frame `frame_offset`, `commit=True` stores
        its K/V as context.
        """
        self._check(x, t, context, cameras, cond)
        cfg = self.cfg
        B, C, F_, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = F_ // pt, H // ph, W // pw
        tokens = self.embed(x, cond)  # (B, f*h*w, dim)
        t = t.float()
        if t.ndim == 1:
            t = t[:, None]  # (B, 1): one timestep for all frames
        frames = torch.arange(f, device=x.device) + frame_offset
        cams = cameras.matrices() if cameras is not None else None  # (P, P_inv), each (B, f, 4, 4)
        mask = None
        n_frames = f
        if clean is not None:  # teacher forcing: [clean | noisy] share positions and cameras
            tokens = torch.cat([self.embed(clean, cond), tokens], 1)
            t_clean = torch.zeros_like(t.expand(B, f)) if clean_t is None else clean_t.float().expand(B, f)
            t = torch.cat([t_clean, t.expand(B, f)], 1)  # (B, 2f)
            frames = torch.cat([frames, frames])
            cams = None if cams is None else (torch.cat([cams[0]] * 2, 1), torch.cat([cams[1]] * 2, 1))
            flex = self.flex if self.flex is not None else x.is_cuda
            mask = (teacher_forcing_block_mask if flex else teacher_forcing_mask)(f, cfg.chunk // pt or 1, h * w,
                                                                                  x.device, sink, window)
            n_frames = 2 * f
        rd = cfg.head_dim - cfg.inline_prope_dim
        pos = dict(rope=rope_tables(rd, frames, h, w, cfg.rope_theta, x.device), cams=cams, mask=mask,
                   cache=cache, commit=commit, n_frames=n_frames)
        # the sinusoid is fp32 (timesteps up to 1000 need it); the embedding layers may be bf16
        temb = self.time_embedding(sinusoidal(t, cfg.freq_dim).to(self.time_embedding[0].weight.dtype))  # (B, Ft, dim)
        e = self.time_projection(temb).unflatten(-1, (6, cfg.dim))  # (B, Ft, 6, dim)
        text_kv = self.text_kv(context, cache)
        for i, block in enumerate(self.blocks):
            if self.grad_ckpt and torch.is_grad_enabled() and cache is None:  # recompute in the backward
                tokens = checkpoint(block, tokens, e, text_kv[i], pos, i, use_reentrant=False)
            else:
                tokens = block(tokens, e, text_kv[i], pos, i)
        if cache is not None and commit:
            cache.advance(f)
        out = self.head(tokens, temb, n_frames)  # (B, N, C*pt*ph*pw)
        if clean is not None:
            out = out[:, out.shape[1] // 2:]
        out = out.view(B, f, h, w, pt, ph, pw, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, C, F_, H, W).to(x.dtype)  # the samplers keep latents in x's dtype (fp32)

    def text_kv(self, context, cache=None):
        """Every layer's cross-attention k, v of the text (B, L, text_dim). A rollout's cache keeps them:
        the text is the same for every chunk and step, so they are computed once (not while training
        through the cache, where the gradient must reach the text projections)."""
        reuse = cache is not None and not torch.is_grad_enabled()
        if reuse and cache.text[0] is not None and cache.text[0][0] is context:
            return [kv for _, kv in cache.text]
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))  # (B, L, dim)
        kv = [block.cross_attn.text_kv(ctx) for block in self.blocks]
        if reuse:
            cache.text = [(context, layer_kv) for layer_kv in kv]
        return kv

    def new_cache(self, batch, height, width, sink=TRAIN_SINK, window=64, device=None, dtype=None):
        """A KV cache for latents of (height, width); sink + window in latent frames; dtype: the model's."""
        dtype = dtype or self.patch_embedding.weight.dtype
        tpf = (height // self.cfg.patch_size[1]) * (width // self.cfg.patch_size[2])
        return KVCache(self.cfg, batch, tpf, sink, window, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# 5. flow matching: schedule and samplers (README, Design notes: sigma and t)
#    sigma in [0, 1], t = 1000 sigma, x_t = (1 - sigma) x0 + sigma noise, v = noise - x0, x0 = x_t - sigma v


# the few-step sampler's timesteps (Self-Forcing / Causal Forcing lineage), warped through the shift
FEW_STEP_TIMESTEPS = (1000, 750, 500, 250)


def shift_sigma(sigma, shift):
    """The shifted schedule sigma' = s sigma / (1 + (s - 1) sigma): more steps spent at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def euler_sigmas(steps, shift=1.0):
    """steps + 1 decreasing sigmas from 1 to 0 (many-step Euler sampling)."""
    return shift_sigma(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).tolist()


def few_step_sigmas(timesteps=FEW_STEP_TIMESTEPS, shift=1.0):
    """The few-step list warped through the shifted schedule, with a final 0 appended."""
    return [float(shift_sigma(torch.tensor(t / 1000.0, dtype=torch.float64), shift)) for t in timesteps] + [0.0]


def add_noise(x0, noise, sigma):
    """sigma: a float or (B,) / (B, 1, F, 1, 1)-broadcastable tensor."""
    return (1 - sigma) * x0 + sigma * noise


def flow_matching_loss(model, x0, noise, sigma, text, cameras, cond, clean=None, clean_t=None, **kw):
    """MSE between the predicted velocity at x_t = (1 - σ) x0 + σ ε and the target v = ε - x0.

    Phase 1 (paper §2.1: bidirectional, whole clips); Stage 1 (§2.2: clean= the ground-truth clip,
    teacher forcing, σ per chunk); Stage 3's critic (§2.3: x0 = the student's samples).
    sigma: (B,) one level per clip, or (B, F) one per latent frame.
    """
    s = sigma.view(-1, 1, 1, 1, 1) if sigma.ndim == 1 else sigma[:, None, :, None, None]
    v = model(add_noise(x0, noise, s), 1000 * sigma, text, cameras, cond, clean=clean, clean_t=clean_t, **kw)
    return F.mse_loss(v.float(), (noise - x0).float())


def timestep(sigma, B, device):
    """(B,) network timesteps t = 1000 sigma for a python float sigma."""
    return torch.full((B,), 1000.0 * sigma, device=device)


def guided_velocity(model, x, t, context, *args, guidance=1.0, **kw):
    """Classifier-free guidance: v_u + g (v_c - v_u), the unconditional branch on null (zero) text.

    Training drops captions (text_drop) so the null-text branch exists. Not for cached calls: the
    unconditional branch would need its own KV cache.
    """
    v = model(x, t, context, *args, **kw)
    if guidance == 1.0:
        return v
    v_u = model(x, t, torch.zeros_like(context), *args, **kw)
    return v_u + guidance * (v - v_u)


@torch.no_grad()
def sample_bidir(model, noise, context, cameras=None, cond=None, sigmas=None, guidance=1.0, progress=None):
    """Euler integration of the PF-ODE over the whole clip (bidirectional mode), optional CFG."""
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = guided_velocity(model, x, timestep(s, x.shape[0], x.device), context, cameras, cond, guidance=guidance)
        x = x + (s_next - s) * v
        if progress is not None:
            progress()
    return x


@torch.no_grad()
def generate_chunk(model, cache, noise, start, context, cameras=None, cond=None, sigmas=None, renoise=False,
                   generator=None, commit_frames=None):
    """Denoise one chunk (noise (B, C, f, h, w), first frame at absolute index `start`) against the cache.

    renoise=False: Euler steps (many-step sampling of the AR diffusion model); renoise=True: the
    few-step sampler - predict x0, re-noise to the next sigma with fresh noise (Stages 2-3). Then the
    clean chunk (the first one with the given image as frame 0: given_first) is re-run once at t = 0 with
    commit=True so it becomes context for the next chunks.
    commit_frames: latents (B, C, f, h, w) committed in its place (an oracle of the cache: metric.py long --context).
    """
    x = noise
    B = x.shape[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = model(x, timestep(s, B, x.device), context, cameras, cond, cache=cache, frame_offset=start)
        if renoise:
            x0 = x - s * v
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if s_next > 0 else 0
            x = add_noise(x0, eps, s_next)
        else:
            x = x + (s_next - s) * v
    x = given_first(x, cond, start)
    commit(model, cache, x if commit_frames is None else commit_frames, start, context, cameras, cond, generator)
    return x


def given_first(x, cond, start):
    """A chunk that starts the video (start 0) with frame 0 set to the given image's latent, the first C channels
    of its condition (image_cond): the cache's sink then remembers the image itself, as teacher forcing's
    context did, not the model's reproduction of it (the shipped `dmd`'s is 0.014 off in colour). x: (B, C, f, h, w)."""
    if start > 0 or cond is None:  # T2V checkpoints have no given image
        return x
    x = x.clone()
    x[:, :, 0] = cond[:, :x.shape[1], 0]
    return x


def commit(model, cache, x0, start, context, cameras=None, cond=None, generator=None):
    """Run the finished chunk x0 (B, C, f, h, w) once more with commit=True: its K/V become context.

    A model trained with noisy context (cfg.context_sigma > 0) gets it noised to that sigma, t = 1000 sigma,
    as it saw its context in training; the sink frames stay clean (frame 0, the given image, and with the
    streaming sink of 2 the first generated frame: clean, it kept a long rollout's colours better than at
    context_sigma; LONG_ROLLOUTS.md, "The sink of 2 is now the streaming default")."""
    B, f = x0.shape[0], x0.shape[2]
    level, t = getattr(model.cfg, "context_sigma", 0.0), timestep(0.0, B, x0.device)
    if level > 0:
        sigma = torch.full((B, f), level, device=x0.device)
        sigma[:, : max(0, cache.sink - start)] = 0.0
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x0, t = add_noise(x0, eps, sigma[:, None, :, None, None]), 1000 * sigma
    model(x0, t, context, cameras, cond, cache=cache, commit=True, frame_offset=start)


def noisy_context(x0, u, noise, cfg, chunk):
    """Stages 1-2 with cfg.context_noise > 0: the teacher-forcing context x0 (B, C, F, h, w) noised per
    chunk to sigma = u * context_noise (u (B, F) uniforms, noise like x0; frame 0, the given image, stays
    clean) -> (context, its timesteps (B, F)); (x0, None) for a model trained on clean context."""
    if cfg.context_noise <= 0:
        return x0, None
    sigma = u[:, ::chunk].repeat_interleave(chunk, 1)[:, :x0.shape[2]] * cfg.context_noise
    sigma[:, 0] = 0.0
    return add_noise(x0, noise, sigma[:, None, :, None, None]), 1000 * sigma


@torch.no_grad()
def sample_ar(model, noise, context, cameras=None, cond=None, sigmas=None, renoise=False, sink=TRAIN_SINK,
              window=64, generator=None, commit_frames=None):
    """Chunk-by-chunk AR rollout of a whole clip through a fresh KV cache (the control metric, DMD).
    commit_frames: latents (B, C, F, h, w) the cache is given in place of the generated chunks: the rollout
    then remembers those frames, not its own (metric.py long --context=truth: a perfect memory)."""
    B, C, F_, H, W = noise.shape
    chunk = model.cfg.chunk
    cache = model.new_cache(B, H, W, sink=sink, window=window, device=noise.device)
    out = []
    for start in range(0, F_, chunk):
        stop = min(start + chunk, F_)
        out.append(generate_chunk(model, cache, noise[:, :, start:stop], start, context,
                                  cameras.frames(start, stop) if cameras is not None else None,
                                  cond[:, :, start:stop] if cond is not None else None, sigmas, renoise, generator,
                                  None if commit_frames is None else commit_frames[:, :, start:stop]))
    return torch.cat(out, 2)


def image_cond(first, frames, start=0):
    """TI2V condition: the first latent frame copied into every frame's channels + a frame-0 mask.

    first: (B, C, H, W) -> (B, C + 1, F, H, W) for frames [start, start + F) of the video. Copying frame 0 everywhere (not only at frame 0) lets
    every chunk of an AR rollout see the image directly (it helped the CPU prototypes learn control).
    """
    B, C, H, W = first.shape
    cond = first[:, :, None].expand(B, C, frames, H, W)
    mask = torch.zeros(B, 1, frames, H, W, dtype=first.dtype, device=first.device)
    if start == 0:
        mask[:, :, 0] = 1
    return torch.cat([cond, mask], 1)


@torch.no_grad()
def enable_image_cond(model):
    """Turn a T2V DiT into a TI2V one: widen patch_embedding by (C + 1) zero-initialized input channels.

    The new channels carry the condition latent and mask (image_cond above); being zero at init, the
    widened model equals the base model exactly until training moves them.
    """
    cfg = model.cfg
    if cfg.image_cond:
        return model
    old = model.patch_embedding
    new = nn.Conv3d(2 * cfg.out_channels + 1, cfg.dim, cfg.patch_size, stride=cfg.patch_size).to(old.weight)
    new.weight.zero_()
    new.weight[:, : old.in_channels] = old.weight
    new.bias.copy_(old.bias)
    model.patch_embedding = new
    cfg.image_cond, cfg.in_channels = True, 2 * cfg.out_channels + 1
    return model


@torch.no_grad()
def enable_prope_branch(model):
    """Give a camera-free base model (prope "none": Wan2.1, HunyuanVideo-1.5) the PRoPE branch in place.

    The branch is a parallel attention of the projective q/k/v (computed from the weights the model has)
    whose output enters through a zero-initialized projection per block (the DiT's self_attn.prope_proj,
    the MMDiT's img_attn_prope_proj: each attention class names its own in PROPE_PROJ), so the model equals
    the base exactly until training moves it. A model that already has PRoPE is returned as it is.
    """
    cfg = model.cfg
    if cfg.prope != "none":
        return model
    if cfg.head_dim % 4:  # the projective transform acts on 4-vectors of each head's channels
        raise ValueError(f"PRoPE needs head_dim % 4 == 0, got {cfg.head_dim}")
    cfg.prope = "branch"
    for m in model.modules():
        name = getattr(type(m), "PROPE_PROJ", None)
        if name:
            ref = next(m.parameters())
            setattr(m, name, zero_linear(cfg.dim).to(device=ref.device, dtype=ref.dtype))
    return model


# ----------------------------------------------------------------------------------------------
# 6. loading real checkpoints: Wan2.1 original / diffusers layouts, shards, minWM, CausVid-lineage .pt

# diffusers WanTransformer3DModel name -> original Wan name (note diffusers' norm2 is Wan's norm3)
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.(norm_[qk])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.(norm_[qk])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]

# key fragments of other architectures, so a wrong file is refused in one line
_OTHER_ARCHS = [
    ("transformer_blocks.", "a diffusers transformer of another family (transformer_blocks.*)"),
    ("encoder.block.", "a T5 / UMT5 text encoder"),
    ("decoder.conv_in.", "a VAE"),
    ("lm_head.", "a language model"),
]


def rename_keys(sd, table):
    """A state dict with each key renamed by the first (pattern, replacement) of `table` that matches it
    (keys no pattern matches pass through unchanged)."""
    out = {}
    for k, v in sd.items():
        for pat, rep in table:
            k2 = re.sub(pat, rep, k)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def diffusers_to_wan(sd):
    """A diffusers WanTransformer3DModel state dict -> original Wan2.1 names."""
    return rename_keys(sd, _DIFFUSERS_TO_WAN)


def _read_safetensors(path):
    """-> (tensors, the file's metadata dict)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # truncated / corrupt / not a safetensors file
        raise ValueError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None


def _read_weights(path):
    """-> (state dict in whatever layout the file has, config, kind). kind "minwm": config is a
    ModelConfig dict (from the weights' own metadata, a .pt's "model_config", or NAME.json beside
    them); "folder" / "file" / "pt": foreign weights, config a diffusers / Wan config.json or None."""
    if not os.path.exists(path) and os.path.exists(path + ".safetensors"):  # a minWM stem: out/bidir
        path += ".safetensors"
    if path.endswith(".json") and os.path.exists(path[:-5] + ".safetensors"):  # named by its JSON
        path = path[:-5] + ".safetensors"
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else None
        index = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
        if index:
            weight_map = json.load(open(os.path.join(path, index[0])))["weight_map"]
            sd = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(_read_safetensors(os.path.join(path, shard))[0])
        else:
            files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
            if not files:
                raise ValueError(f"{path}: folder holds no .safetensors weights")
            if len(files) > 1:
                raise ValueError(f"{path}: several .safetensors files but no *.safetensors.index.json: {files}")
            sd = _read_safetensors(os.path.join(path, files[0]))[0]
        return sd, cfg, "folder"
    if path.endswith((".pt", ".pth", ".bin")):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle that needs code to run is refused here, never executed
            raise ValueError(f"{path}: not a plain tensor file: torch.load(weights_only=True) refused it "
                             f"({str(e).splitlines()[0][:120]})") from None
        config = obj.get("model_config") if isinstance(obj, dict) else None
        for key in ("generator_ema", "generator", "model", "state_dict", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: holds no state dict of tensors")
        return (obj, config, "minwm") if isinstance(config, dict) else (obj, None, "pt")
    sd, header = _read_safetensors(path)
    if "model" in header:  # written by minWM: the config travels inside the weights
        return sd, json.loads(header["model"]), "minwm"
    meta_path = path[: -len(".safetensors")] + ".json"
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    return (sd, meta["model"], "minwm") if meta and isinstance(meta.get("model"), dict) else (sd, None, "file")


# Wan releases name no head count in their weights; their head size is 128 (1.3B: 1536 = 12 x 128, 14B: 40)
WAN_HEADS = {1536: 12, 5120: 40}


def _config_from(sd, cfg_json, kind, overrides, path):
    """ModelConfig from a minWM config, a diffusers / Wan config.json, or the shapes of a Wan release.
    What the weights cannot tell (the head count of an unknown size, inline PRoPE, which has no
    parameters) is never guessed: the error says which flag supplies it."""
    names = {f.name for f in fields(ModelConfig)}
    if kind == "minwm":
        return ModelConfig(**{**{k: v for k, v in cfg_json.items() if k in names}, **overrides})
    pw = sd["patch_embedding.weight"]  # (dim, in, pt, ph, pw)
    dim, in_ch, patch = pw.shape[0], pw.shape[1], tuple(pw.shape[2:])
    out_ch = sd["head.head.weight"].shape[0] // math.prod(patch)
    heads = overrides.pop("num_heads", None)
    if cfg_json and "num_attention_heads" in cfg_json:  # diffusers config.json
        if cfg_json.get("added_kv_proj_dim") or cfg_json.get("image_dim"):
            raise ValueError("Wan I2V checkpoints (image cross-attention) are not supported; use a T2V model")
        heads = heads or cfg_json["num_attention_heads"]
    elif cfg_json and "num_heads" in cfg_json:  # the original Wan release's config.json
        heads = heads or cfg_json["num_heads"]
    image_cond = in_ch == 2 * out_ch + 1
    has_branch = any("prope" in k for k in sd)
    if heads is None and (dim not in WAN_HEADS or image_cond):
        raise ValueError(f"{path}: the weights carry no model config, and they are not a Wan release whose "
                         f"config the shapes give (dim {dim}, {in_ch} input channels): the head count and the "
                         f"PRoPE placement are unknown. Give the config with --model_config=FILE.json (the "
                         f"checkpoint's NAME.json, or ModelConfig fields), or load a minWM checkpoint")
    cfg = dict(dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_heads=heads or WAN_HEADS[dim],
               num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
               in_channels=in_ch, out_channels=out_ch, patch_size=patch,
               text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
               cross_attn_norm="blocks.0.norm3.weight" in sd, image_cond=image_cond,
               prope="branch" if has_branch else "none", eps=(cfg_json or {}).get("eps", 1e-6))
    return ModelConfig(**{**cfg, **overrides})


def read_model_config(path):
    """A --model_config file: a minWM checkpoint's JSON (its "model") or a JSON object of ModelConfig fields."""
    try:
        doc = json.loads(open(path).read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({' '.join(str(e).split())[:120]})") from None
    doc = doc.get("model", doc) if isinstance(doc, dict) else None
    names = {f.name for f in fields(ModelConfig)}
    if not isinstance(doc, dict) or not doc or not set(doc) <= names:
        raise ValueError(f"{path}: not a model config (a checkpoint's JSON, or an object of: {', '.join(sorted(names))})")
    return doc


def load_state(model, sd, source="checkpoint", allow_missing=()):
    """Strict load that names missing / unexpected / mis-shaped keys instead of a torch traceback."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not any(a in k for a in allow_missing)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what}: " + ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else ""))
    if problems:
        raise ValueError(f"{source}: does not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    return model


def load_pretrained(path, use_ema=True, device="cpu", model_config=None, **overrides):
    """Load a DiT from any supported checkpoint; returns the model (with .cfg).

    path: a .safetensors file (Wan original or diffusers names; a minWM checkpoint when NAME.json sits
    beside it), a folder (diffusers `save_pretrained` with config.json, or shards with a
    *.safetensors.index.json), or a CausVid / Self-Forcing / Causal-Forcing .pt (generator_ema or
    generator; read with weights_only=True). The model config comes from the weights themselves (minWM
    writes it into every file), NAME.json beside them, a diffusers config.json, or the shapes of a Wan
    release; model_config (a --model_config JSON file) supplies it for weights that carry none.
    overrides: ModelConfig fields, e.g. prope="branch" to build a base model with a zero-initialized PRoPE
    branch (enable_prope_branch adds it to a model already loaded).
    A HunyuanVideo-1.5 or HY-WorldPlay file (original or diffusers names) gives an mmdit.MMDiT.
    """
    sd, cfg_json, kind = _read_weights(str(path))
    if model_config and kind != "minwm":
        cfg_json, kind = read_model_config(model_config), "minwm"
    if use_ema and any(k.startswith("ema.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith("ema.")}
    for prefix in ("model.diffusion_model.", "_fsdp_wrapped_module.", "module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    import mmdit  # HunyuanVideo-1.5 / HY-WorldPlay (original or diffusers names) -> the MMDiT
    if mmdit.is_mmdit(sd):
        return mmdit.from_state_dict(sd, cfg_json, kind, str(path), dict(overrides)).to(device)
    if "blocks.0.attn1.to_q.weight" in sd:
        sd = diffusers_to_wan(sd)
    if "blocks.0.self_attn.q.weight" not in sd or "patch_embedding.weight" not in sd:
        for frag, what in _OTHER_ARCHS:
            if any(frag in k for k in sd):
                raise ValueError(f"{path}: this is {what}, not a Wan-layout DiT")
        raise ValueError(f"{path}: not a Wan-layout DiT (no blocks.0.self_attn.q.weight; first keys: "
                         f"{', '.join(list(sd)[:3])})")
    cfg = _config_from(sd, cfg_json, kind, dict(overrides), path)
    model = DiT(cfg)
    new_branch = cfg.prope == "branch" and not any("prope" in k for k in sd)
    load_state(model, sd, str(path), allow_missing=("prope",) if new_branch else ())
    return model.to(device)
