"""The second backbone: HunyuanVideo-1.5's MMDiT (TI2V, 8.3B) with HY-WorldPlay's camera and action
conditioning, behind the call interface of `model.DiT`, so every stage and infer.py run it unchanged.

Why a sibling of model.py: model.py holds the Wan DiT *and* the machinery both networks share; a
second architecture (another block, another naming scheme, its own converter) would take it past
1,200 lines, and one file per architecture keeps each readable top to bottom. What is shared is
imported, never copied: the attention function, the teacher-forcing masks (dense and flex), the KV
cache (its per-layer text slot as the Wan DiT uses it; subclassed only to remember the last camera),
the RoPE tables and rotation, LayerNorm / modulate / gated residual in fp32, the sinusoidal
embedding, PRoPE (prope.py), the first-frame condition, and - outside this file - the
flow-matching loss, the schedule, the samplers and the checkpoint reading (model.load_pretrained
reads the file, sees HY names and hands the state dict to `from_state_dict` here).

Read top to bottom:
  1. MMDiTConfig and PRESETS: hy1.5-ti2v-8b, hy-worldplay, tiny-mmdit (the embedded world)
  2. WorldPlay's discrete action label (0..80) from the camera's motion between latent frames
  3. pieces, named as in the original HY1.5 release: timestep embedder, MLP, the token refiner
     (txt_in), the byT5 and SigLIP projections, the double-stream block, the final layer
  4. the MMDiT and its three attention modes:
       bidirectional   - one joint attention over [image | text] per block: every token sees every token
       teacher forcing - image tokens [clean | noisy] under model.teacher_forcing_mask (optionally
                         windowed; a flex BlockMask on CUDA), plus all text; text tokens see only text
                         (WorldPlay's causal mode), so the text stream does not depend on the video:
                         it runs on its own, at t = 0
       cached rollout  - the chunk's image tokens attend to the KV cache and to the text K/V, which
                         the cache computes at its first call and keeps (as the Wan DiT's cross-attention)
  5. loading: diffusers -> original names (copies, fused-qkv concatenation, the final layer's
     scale/shift swap), the config from a state dict's shapes

Parameter names follow the ORIGINAL HY1.5 layout (`double_blocks.0.img_attn_q.weight`); WorldPlay adds
`action_in.*` and `double_blocks.N.img_attn_prope_proj.*`. Conditions: Qwen2.5-VL text (3584) is the
`context` of the common interface; byT5 glyph states (1472) and SigLIP image states (1152) are the
optional keywords `context_2` and `image_embeds` (absent = HY1.5's masked-out tokens).
"""
import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils.checkpoint import checkpoint

import cameras as camera_files
import model as M
import prope

FREQ_DIM = 256  # sinusoidal width of HY1.5's timestep-style embedders (time, refiner time, action)
BYT5_HIDDEN = 2048  # the byT5 mapper's inner width: fixed in HY1.5 (and diffusers) whatever the model width


# ----------------------------------------------------------------------------------------------
# 1. config


@dataclass
class MMDiTConfig:
    dim: int = 128
    num_heads: int = 2
    num_layers: int = 4  # double-stream blocks (54 in HY1.5)
    refiner_layers: int = 1  # token-refiner blocks over the text (2 in HY1.5)
    mlp_ratio: float = 4.0
    in_channels: int = 25  # noisy latents | first-frame condition latent | mask (image_cond), as model.ModelConfig
    out_channels: int = 12  # channels of the latents x
    patch_size: tuple = (1, 2, 2)
    text_dim: int = 64  # Qwen2.5-VL hidden states: 3584
    byt5_dim: int = 0  # byT5 glyph states: 1472 (0 = no byT5 projection)
    vision_dim: int = 0  # SigLIP image states: 1152 (0 = no vision projection)
    rope_theta: float = 256.0
    rope_axes: tuple = ()  # RoPE channels on (t, h, w); () = HY's 16/56/56 of 128, scaled to the RoPE channels
    eps: float = 1e-6
    image_cond: bool = True
    prope: str = "inline"  # none | branch (WorldPlay: parallel attention, zero-init img_attn_prope_proj) | inline
    prope_dim: int = 0  # inline only: projective channels per head (0 = head_dim // 2)
    prope_text: bool = False  # the branch also attends to the text tokens, as WorldPlay's does; their keys
    #                           carry no camera, so the network is then not exactly invariant to the world frame
    action: bool = True  # WorldPlay's action_in: a discrete action label per latent frame, from the cameras
    chunk: int = 2  # latent frames per AR chunk (4 in WorldPlay)
    context_noise: float = 0.0  # the context convention of a causal model: model.ModelConfig says what they mean
    context_sigma: float = 0.0

    def __post_init__(self):
        self.patch_size, self.rope_axes = tuple(self.patch_size), tuple(self.rope_axes)
        if self.dim % self.num_heads:
            raise ValueError(f"MMDiTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.prope not in ("none", "branch", "inline"):
            raise ValueError(f"MMDiTConfig.prope must be none|branch|inline, got {self.prope!r}")
        want = 2 * self.out_channels + 1 if self.image_cond else self.out_channels
        if self.in_channels != want:
            raise ValueError(f"MMDiTConfig: in_channels {self.in_channels} != {want} "
                             f"(out_channels {self.out_channels}, image_cond {self.image_cond})")
        pd = self.inline_prope_dim
        if self.prope == "inline" and (pd % 4 or not 0 < pd < self.head_dim):
            raise ValueError(f"MMDiTConfig.prope_dim {pd} must be a multiple of 4 inside head_dim {self.head_dim}")
        if self.prope == "branch" and self.head_dim % 4:
            raise ValueError(f"MMDiTConfig: PRoPE needs head_dim % 4 == 0, got {self.head_dim}")
        split = self.rope_split
        if sum(split) != self.head_dim - pd or any(a % 2 for a in split):
            raise ValueError(f"MMDiTConfig.rope_axes {split} must be even and sum to the {self.head_dim - pd} RoPE "
                             f"channels per head")

    @property
    def head_dim(self):
        return self.dim // self.num_heads

    @property
    def inline_prope_dim(self):
        return (self.prope_dim or self.head_dim // 2) if self.prope == "inline" else 0

    @property
    def rope_split(self):
        """(t, h, w) RoPE channels: rope_axes, else HY's 16/56/56 split of 128 scaled (t = d/8, h = w even)."""
        if self.rope_axes:
            return self.rope_axes
        d = self.head_dim - self.inline_prope_dim
        t = 2 * (d // 16)
        t += (d - t) % 4  # h = w = (d - t) / 2 must be even (interleaved pairs)
        return (t, (d - t) // 2, (d - t) // 2)


_HY15 = dict(dim=2048, num_heads=16, num_layers=54, refiner_layers=2, mlp_ratio=4.0, in_channels=65,
             out_channels=32, patch_size=(1, 1, 1), text_dim=3584, byt5_dim=1472, vision_dim=1152,
             rope_theta=256.0, rope_axes=(16, 56, 56), image_cond=True, chunk=4)
PRESETS = {
    # The embedded world, sized like model.py's "tiny": 12 x 16 x 16 latents, patch 2 -> 8 x 8 tokens per
    # frame, dim 128, 2 heads, 4 double-stream blocks, the toy 64-wide text embedding; inline PRoPE from scratch.
    "tiny-mmdit": dict(),
    "hy1.5-ti2v-8b": dict(_HY15, prope="none", action=False),
    "hy-worldplay": dict(_HY15, prope="branch", prope_text=True, action=True),
}


def make_config(preset="tiny-mmdit", **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown MMDiT preset {preset!r}; choose from {sorted(PRESETS)}")
    return MMDiTConfig(**{**PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------------
# 2. WorldPlay's discrete action: translation class x 9 + rotation class, from the camera motion

# one-hot pairs -> class, as WorldPlay: translation (forward, backward, right, left) and rotation
# (yaw right, yaw left, pitch up, pitch down) each map {none: 0, a: 1, b: 2, c: 3, d: 4, a+c: 5, a+d: 6,
# b+c: 7, b+d: 8}; rows: none / a / b, columns: none / c / d
_ACTION_CLASS = [[0, 3, 4], [1, 5, 6], [2, 7, 8]]
MOVE_EPS = 1e-4  # translation below this (in the file's units) is no translation
TURN_EPS_DEG = 0.05  # rotations below this many degrees are no rotation


def action_labels(w2c, prev=None):
    """WorldPlay's action label (0..80) of each latent frame, from the camera's motion since the frame before.

    w2c: (B, F, 4, 4) world-to-camera (OpenCV axes); prev: (B, 4, 4) the camera of the frame before the
    first, or None (the first frame then has no motion: label 0, as WorldPlay's frame 0). The rule is
    WorldPlay's `pose_to_input`: the current camera in the previous camera's frame, rel = c2w_prev⁻¹ c2w;
    if its translation t is longer than MOVE_EPS, forward / backward when the angle between t and +z is
    under 60° / over 120° (t̂_z > 0.5 / < -0.5), right / left the same with +x; yaw and pitch are the
    y and x angles of rel's rotation as extrinsic xyz Euler angles (scipy's "xyz"): yaw > TURN_EPS_DEG
    turns right, < -TURN_EPS_DEG left, pitch > TURN_EPS_DEG up, < -TURN_EPS_DEG down (+z towards -y).
    Returns (B, F) long: translation_class * 9 + rotation_class.
    """
    w2c = w2c.double()
    before = torch.cat([(w2c[:, :1] if prev is None else prev.double()[:, None]), w2c[:, :-1]], 1)  # (B, F, 4, 4)
    rel = before @ camera_files.rigid_inverse(w2c)  # c2w_prev⁻¹ c2w = w2c_prev c2w: (B, F, 4, 4)
    t = rel[..., :3, 3]
    length = t.norm(dim=-1)
    d = t / length.clamp_min(1e-12)[..., None]
    moving = length > MOVE_EPS
    fwd_back = torch.where(moving & (d[..., 2] > 0.5), 1, torch.where(moving & (d[..., 2] < -0.5), 2, 0))
    right_left = torch.where(moving & (d[..., 0] > 0.5), 1, torch.where(moving & (d[..., 0] < -0.5), 2, 0))
    R = rel[..., :3, :3]
    pitch = torch.rad2deg(torch.atan2(R[..., 2, 1], R[..., 2, 2]))  # extrinsic xyz: R = Rz Ry Rx
    yaw = torch.rad2deg(torch.asin((-R[..., 2, 0]).clamp(-1, 1)))
    turn = torch.where(yaw > TURN_EPS_DEG, 1, torch.where(yaw < -TURN_EPS_DEG, 2, 0))
    tilt = torch.where(pitch > TURN_EPS_DEG, 1, torch.where(pitch < -TURN_EPS_DEG, 2, 0))
    table = torch.tensor(_ACTION_CLASS, device=w2c.device)
    return table[fwd_back, right_left] * 9 + table[turn, tilt]


# ----------------------------------------------------------------------------------------------
# 3. pieces (module and parameter names are the original HY1.5 release's)


def heads(x, n):
    """(B, N, n * d) -> (B, n, N, d)."""
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def merge(x):
    """(B, n, N, d) -> (B, N, n * d)."""
    return x.transpose(1, 2).flatten(2)


def camera_free(x, pd):
    """Zero the first pd (projective) channels of each head: text tokens carry no camera (inline PRoPE)."""
    return torch.cat([torch.zeros_like(x[..., :pd]), x[..., pd:]], -1) if pd else x


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (FREQ_DIM wide) -> Linear -> SiLU -> Linear. time_in, txt_in.t_embedder, action_in."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (...,) on the 0..1000 scale (or an action label 0..80) -> (..., dim)
        return self.mlp(M.sinusoidal(t, FREQ_DIM).to(self.mlp[0].weight.dtype))  # the sinusoid in fp32


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TextProjection(nn.Module):  # the refiner's pooled-text embedder (c_embedder)
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class RefinerBlock(nn.Module):
    """Self-attention + MLP over the text tokens, each branch gated by (time + pooled text); no qk-norm."""

    def __init__(self, cfg):
        super().__init__()
        D, self.H = cfg.dim, cfg.num_heads
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
        self.self_attn_qkv = nn.Linear(D, 3 * D)  # fused q | k | v (diffusers splits it: to_q, to_k, to_v)
        self.self_attn_proj = nn.Linear(D, D)
        self.mlp = MLP(D, int(D * cfg.mlp_ratio), nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):  # x (B, L, D), c (B, D)
        gate_attn, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(2, -1)  # (B, 1, D) each
        q, k, v = (heads(y, self.H) for y in self.self_attn_qkv(self.norm1(x)).chunk(3, -1))  # (B, H, L, d)
        x = M.gated_residual(x, self.self_attn_proj(merge(M.attention(q, k, v))), gate_attn)
        return M.gated_residual(x, self.mlp(self.norm2(x)), gate_mlp)


class TokenRefiner(nn.Module):
    """txt_in: the Qwen2.5-VL states -> model width, refined by a few blocks conditioned on time + pooled text."""

    def __init__(self, cfg):
        super().__init__()
        self.input_embedder = nn.Linear(cfg.text_dim, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.dim)
        self.c_embedder = TextProjection(cfg.text_dim, cfg.dim)
        # a container only so that the names read txt_in.individual_token_refiner.blocks.N, as the release's
        self.individual_token_refiner = nn.ModuleDict(
            dict(blocks=nn.ModuleList(RefinerBlock(cfg) for _ in range(cfg.refiner_layers))))

    def forward(self, text, t):  # text (B, L, text_dim), t (B,) -> (B, L, D)
        text = text.to(self.input_embedder.weight.dtype)
        c = self.t_embedder(t) + self.c_embedder(text.mean(1))  # (B, D); padding is the caller's job, as in DiT
        x = self.input_embedder(text)
        for block in self.individual_token_refiner["blocks"]:
            x = block(x, c)
        return x


class ByT5Mapper(nn.Module):  # byt5_in: glyph text states -> model width
    def __init__(self, in_dim, dim):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1, self.fc2 = nn.Linear(in_dim, BYT5_HIDDEN), nn.Linear(BYT5_HIDDEN, BYT5_HIDDEN)
        self.fc3 = nn.Linear(BYT5_HIDDEN, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(self.layernorm(x))))))


class VisionProjection(nn.Module):  # vision_in: SigLIP states of the first frame -> model width
    def __init__(self, in_dim, dim):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, dim),
                                  nn.LayerNorm(dim))

    def forward(self, x):
        return self.proj(x)


class PatchEmbed(nn.Module):  # img_in
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)


class Modulation(nn.Module):  # img_mod / txt_mod: SiLU -> Linear(D, 6D), split into 6 vectors
    def __init__(self, dim, n):
        super().__init__()
        self.n, self.linear = n, nn.Linear(dim, n * dim)

    def forward(self, vec):  # (B, Ft, D) -> n x (B, Ft, D)
        return self.linear(F.silu(vec)).chunk(self.n, -1)


class DoubleBlock(nn.Module):
    """HY1.5's double-stream block: image and text tokens keep separate weights (modulation, q/k/v with
    per-head RMS qk-norm, output projection, MLP) and meet in one attention; gated residuals. RoPE and
    PRoPE act on the image tokens only. WorldPlay adds the PRoPE branch: a parallel attention of the
    projective image q/k/v whose output enters through the zero-initialized img_attn_prope_proj."""
    PROPE_PROJ = "img_attn_prope_proj"  # model.enable_prope_branch adds it to a camera-free HY1.5

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, d, hidden = cfg.dim, cfg.head_dim, int(cfg.dim * cfg.mlp_ratio)
        self.img_mod = Modulation(D, 6)  # shift, scale, gate (attention); shift, scale, gate (MLP)
        self.img_attn_q, self.img_attn_k, self.img_attn_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.img_attn_q_norm, self.img_attn_k_norm = M.RMSNorm(d, eps=1e-6), M.RMSNorm(d, eps=1e-6)
        self.img_attn_proj = nn.Linear(D, D)
        self.img_mlp = MLP(D, hidden, nn.GELU(approximate="tanh"))
        self.txt_mod = Modulation(D, 6)
        self.txt_attn_q, self.txt_attn_k, self.txt_attn_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.txt_attn_q_norm, self.txt_attn_k_norm = M.RMSNorm(d, eps=1e-6), M.RMSNorm(d, eps=1e-6)
        self.txt_attn_proj = nn.Linear(D, D)
        self.txt_mlp = MLP(D, hidden, nn.GELU(approximate="tanh"))
        if cfg.prope == "branch":
            self.img_attn_prope_proj = M.zero_linear(D)  # at step 0 the fine-tuned model == the base model

    def image_qkv(self, img, mod, pos):
        """Modulated image tokens -> q, k, v (B, H, N, d) after RoPE / inline PRoPE, and the branch's (q, k, v)."""
        cfg, pd, cams = self.cfg, self.cfg.inline_prope_dim, pos["cams"]
        x = M.modulate(M.layer_norm(img, cfg.eps), mod[0], mod[1], pos["n_frames"])
        q = self.img_attn_q_norm(heads(self.img_attn_q(x), cfg.num_heads))
        k = self.img_attn_k_norm(heads(self.img_attn_k(x), cfg.num_heads))
        v = heads(self.img_attn_v(x), cfg.num_heads)
        rope = pos["rope"]
        if pd and cams is not None:  # inline: channels [:pd] projective, [pd:] RoPE (as the Wan block)
            P, Pi = cams
            qr = torch.cat([prope.apply(q[..., :pd], P.mT), M.apply_rope(q[..., pd:], *rope)], -1)
            kr = torch.cat([prope.apply(k[..., :pd], Pi), M.apply_rope(k[..., pd:], *rope)], -1)
            vr = torch.cat([prope.apply(v[..., :pd], Pi), v[..., pd:]], -1)
        elif pd:  # inline model run without cameras: the projective channels stay untransformed
            qr = torch.cat([q[..., :pd], M.apply_rope(q[..., pd:], *rope)], -1)
            kr = torch.cat([k[..., :pd], M.apply_rope(k[..., pd:], *rope)], -1)
            vr = v
        else:
            qr, kr, vr = M.apply_rope(q, *rope), M.apply_rope(k, *rope), v
        branch = None
        if cfg.prope == "branch" and cams is not None:  # WorldPlay: the pre-RoPE q, k, v, fully projective
            P, Pi = cams
            branch = (prope.apply(q, P.mT), prope.apply(k, Pi), prope.apply(v, Pi))
        return qr, kr, vr, branch

    def text_qkv(self, txt, mod):
        """Modulated text tokens (B, L, D) -> q, k, v (B, H, L, d); no RoPE, no camera."""
        cfg, pd = self.cfg, self.cfg.inline_prope_dim
        x = M.modulate(M.layer_norm(txt, cfg.eps), mod[0], mod[1], 1)
        q = self.txt_attn_q_norm(heads(self.txt_attn_q(x), cfg.num_heads))
        k = self.txt_attn_k_norm(heads(self.txt_attn_k(x), cfg.num_heads))
        v = heads(self.txt_attn_v(x), cfg.num_heads)
        # inline PRoPE: the text takes no part in the projective channels, so that every logit and value
        # there is a relative camera transform between two image tokens
        return camera_free(q, pd), camera_free(k, pd), camera_free(v, pd)

    def text_out(self, txt, o, mod):
        """Text residuals: gated attention output (o (B, H, L, d)), then the gated MLP."""
        txt = M.gated_residual(txt, self.txt_attn_proj(merge(camera_free(o, self.cfg.inline_prope_dim))), mod[2])
        y = self.txt_mlp(M.modulate(M.layer_norm(txt, self.cfg.eps), mod[3], mod[4], 1))
        return M.gated_residual(txt, y, mod[5])

    def forward(self, img, vec, pos, layer, txt=None, vec_txt=None, text_kv=None):
        """img (B, N, D), vec (B, Ft, D). Bidirectional: txt (B, L, D) and vec_txt (B, 1, D) are given and
        updated jointly with img. Causal modes: text_kv = (k, v) of the text at this layer, txt None.
        Returns (img, txt)."""
        cfg, cams = self.cfg, pos["cams"]
        mod = self.img_mod(vec)  # 6 x (B, Ft, D)
        q, k, v, branch = self.image_qkv(img, mod, pos)
        N = q.shape[2]
        if txt is not None:
            tmod = self.txt_mod(vec_txt)
            qt, kt, vt = self.text_qkv(txt, tmod)
        else:
            kt, vt = text_kv
        new = [k, v] + (list(branch[1:]) if branch else [])  # the image keys/values: through the cache, if any
        if pos["cache"] is not None:  # the chunk and what the cache holds: no mask
            new, _ = pos["cache"].attend(layer, new, pos["n_frames"], pos["commit"])
        # teacher forcing: the block-causal mask over the image keys, and the same with the text keys appended
        # (seen by every image token); None in the other modes
        mask, full = pos["mask"], pos["mask_text"]
        keys, values = torch.cat([new[0], kt], 2), torch.cat([new[1], vt], 2)  # (B, H, S + L, d)
        if txt is not None:  # bidirectional: the text queries join the same attention
            o = M.attention(torch.cat([q, qt], 2), keys, values)
            o, ot = o[:, :, :N], o[:, :, N:]
            txt = self.text_out(txt, ot, tmod)
        else:
            o = M.attention(q, keys, values, full)  # (B, H, N, d)
        ob = None
        if branch:
            if cfg.prope_text:
                ob = M.attention(branch[0], torch.cat([new[2], kt], 2), torch.cat([new[3], vt], 2), full)
            else:
                ob = M.attention(branch[0], new[2], new[3], mask)
        pd = cfg.inline_prope_dim
        if pd and cams is not None:
            o = torch.cat([prope.apply(o[..., :pd], cams[0]), o[..., pd:]], -1)
        y = self.img_attn_proj(merge(o))
        if ob is not None:
            y = y + self.img_attn_prope_proj(merge(prope.apply(ob, cams[0])))
        img = M.gated_residual(img, y, mod[2])
        y = self.img_mlp(M.modulate(M.layer_norm(img, cfg.eps), mod[3], mod[4], pos["n_frames"]))
        return M.gated_residual(img, y, mod[5]), txt


class FinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.linear = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))

    def forward(self, x, vec, frames):  # x (B, N, D), vec (B, Ft, D)
        shift, scale = self.adaLN_modulation(vec).chunk(2, -1)  # the original order (diffusers stores scale, shift)
        return self.linear(M.modulate(M.layer_norm(x, self.eps), shift, scale, frames))


# ----------------------------------------------------------------------------------------------
# 4. the MMDiT


class MMKVCache(M.KVCache):
    """model.KVCache (image K/V; its `text` slot holds the text stream's K/V per layer, as for the Wan DiT's
    cross-attention) plus the camera of the last committed frame: the previous pose of the next chunk's
    first action label (WorldPlay)."""

    @staticmethod
    def layout(cfg):
        """k, v (+ k, v of the PRoPE branch, which also attends to the text keys: its own tensors), H heads."""
        return (4 if cfg.prope == "branch" else 2), cfg.num_heads

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_w2c = None  # (B, 4, 4)

    def reset(self):
        super().reset()
        self.last_w2c = None


@functools.lru_cache(maxsize=16)
def teacher_forcing_text_block_mask(frames, chunk, tokens_per_frame, text_len, device, sink=0, window=None):
    """model.teacher_forcing_block_mask with text_len more key columns, seen by every image token (flex)."""
    image = M.teacher_forcing_block_mask(frames, chunk, tokens_per_frame, device, sink, window).mask_mod
    n = 2 * frames * tokens_per_frame
    return create_block_mask(lambda b, h, q, k: (k >= n) | image(b, h, q, k), None, None, n, n + text_len,
                              device=device)


class MMDiT(nn.Module):
    # The last block's text output is read by nothing (the final layer reads the image tokens), so its
    # text query, projection and MLP get no gradient; common.ddp lets DDP look for such parameters.
    unused_parameters = True

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.img_in = PatchEmbed(cfg)
        if cfg.vision_dim:
            self.vision_in = VisionProjection(cfg.vision_dim, D)
        if cfg.byt5_dim:
            self.byt5_in = ByT5Mapper(cfg.byt5_dim, D)
        self.txt_in = TokenRefiner(cfg)
        self.time_in = TimestepEmbedder(D)
        if cfg.action:
            self.action_in = TimestepEmbedder(D)
            nn.init.zeros_(self.action_in.mlp[2].weight)  # zero at init: the base model's output is unchanged
            nn.init.zeros_(self.action_in.mlp[2].bias)
        self.cond_type_embedding = nn.Embedding(3, D)  # added to 0: Qwen text, 1: byT5, 2: SigLIP tokens
        nn.init.zeros_(self.cond_type_embedding.weight)  # as the release initializes it
        self.double_blocks = nn.ModuleList(DoubleBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layer = FinalLayer(cfg)
        self.grad_ckpt = False  # activation checkpointing per block while training (--grad_ckpt)
        self.flex = None  # teacher forcing with a flex_attention BlockMask: None = on CUDA, else the dense mask

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, x, cond):
        """(B, C, F, H, W) (+ cond channels) -> image tokens (B, F*h*w, D), frame-major."""
        if self.cfg.image_cond:
            if cond is None:
                cond = x.new_zeros(x.shape[0], self.cfg.in_channels - x.shape[1], *x.shape[2:])
            x = torch.cat([x, cond.to(x.dtype)], 1)
        return self.img_in.proj(x.to(self.img_in.proj.weight.dtype)).flatten(2).transpose(1, 2)

    def embed_text(self, context, t, context_2=None, image_embeds=None):
        """The conditioning tokens [SigLIP | byT5 | Qwen text] (B, L, D), each with its condition-type
        embedding (the order of HY1.5's valid tokens; attention does not depend on it). t: (B,)."""
        kind = self.cond_type_embedding.weight  # (3, D)
        parts = [self.txt_in(context, t) + kind[0]]
        if context_2 is not None:
            parts.insert(0, self.byt5_in(context_2.to(kind.dtype)) + kind[1])
        if image_embeds is not None:
            parts.insert(0, self.vision_in(image_embeds.to(kind.dtype)) + kind[2])
        return torch.cat(parts, 1)

    def text_stream(self, context, cache, context_2=None, image_embeds=None):
        """Per-layer text (k, v) of the causal modes: text attends to text only, at t = 0 (WorldPlay's
        text K/V cache). A rollout's cache keeps them, in its `text` slot as the Wan DiT's text_kv does:
        computed once per text (not while training through the cache, where the gradient must reach them)."""
        reuse = cache is not None and not torch.is_grad_enabled()
        if reuse and cache.text[0] is not None and cache.text[0][0] is context:
            return [kv for _, kv in cache.text]
        t0 = torch.zeros(context.shape[0], device=context.device)
        txt = self.embed_text(context, t0, context_2, image_embeds)  # (B, L, D)
        vec_txt = self.time_in(t0)[:, None]  # (B, 1, D)
        kv = []
        for i, block in enumerate(self.double_blocks):
            mod = block.txt_mod(vec_txt)
            q, k, v = block.text_qkv(txt, mod)
            kv.append((k, v))
            if i + 1 < len(self.double_blocks):  # the last block's text output is read by nothing
                txt = block.text_out(txt, M.attention(q, k, v), mod)
        if reuse:
            cache.text = [(context, layer_kv) for layer_kv in kv]
        return kv

    def _check_extra(self, B, context_2, image_embeds):
        for x, width, name in ((context_2, self.cfg.byt5_dim, "context_2 (byT5)"),
                               (image_embeds, self.cfg.vision_dim, "image_embeds (SigLIP)")):
            if x is None:
                continue
            if not width:
                raise ValueError(f"MMDiT: {name} given, but this model has no projection for it")
            if x.ndim != 3 or x.shape[0] != B or x.shape[2] != width:
                raise ValueError(f"MMDiT: {name} must be (B={B}, L, {width}), got {tuple(x.shape)}")

    def forward(self, x, t, context, cameras=None, cond=None, *, clean=None, clean_t=None, cache=None, commit=False,
                frame_offset=0, sink=0, window=None, context_2=None, image_embeds=None):
        """Predict the flow-matching velocity v = noise - x0 (same shape as x); the interface of model.DiT.

        x: (B, C, F, H, W) latents; t: (B,) or per-frame (B, F) on the 0..1000 scale; context: (B, L,
        text_dim) Qwen2.5-VL states; cameras: prope.Cameras of the F frames (PRoPE and, with cfg.action,
        the action labels); cond: (B, in_channels - C, F, H, W) or None (zeros). Modes as model.DiT:
        default bidirectional; `clean=` teacher forcing over [clean | x] (earlier frames limited to `sink`
        + `window` when window is given, as a rollout through KVCache(sink, window) sees them); `cache=`
        a cached rollout of the chunk starting at `frame_offset`, `commit=True` storing its K/V.
        context_2: (B, L2, byt5_dim) byT5 states, image_embeds: (B, L3, vision_dim) SigLIP states of the
        first frame; None leaves those tokens out (HY1.5 masks them out).
        The text stream runs at the clip's timestep when bidirectional (HY1.5; the mean over frames for
        per-frame t), at t = 0 in the causal modes (WorldPlay).
        """
        M.DiT._check(self, x, t, context, cameras, cond)  # the Wan DiT's input checks: they read self.cfg only
        self._check_extra(x.shape[0], context_2, image_embeds)
        cfg = self.cfg
        B, C, F_, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        f, h, w = F_ // pt, H // ph, W // pw
        img = self.embed(x, cond)  # (B, N, D), N = f*h*w
        t_clip = t.float() if t.ndim == 1 else t.float().mean(1)  # (B,): the text stream's, when bidirectional
        # one modulation vector per frame, always: the action (WorldPlay) is per frame, and a model run with and
        # without cameras then rounds alike (its zero-initialized parts add exact zeros)
        t = t.float().view(B, -1).expand(B, f)  # (B, f)
        frames = torch.arange(f, device=x.device) + frame_offset
        cams = cameras.matrices() if cameras is not None else None  # (P, P⁻¹), each (B, f, 4, 4)
        actions = None
        if cfg.action and cameras is not None:  # WorldPlay: one label per frame, from the motion since the last
            prev = cache.last_w2c if cache is not None and frame_offset > 0 else None
            actions = action_labels(cameras.w2c, prev).float()  # (B, f)
        n_frames = f
        if clean is not None:  # teacher forcing: [clean | noisy] share positions, cameras and actions
            img = torch.cat([self.embed(clean, cond), img], 1)
            t_clean = torch.zeros_like(t) if clean_t is None else clean_t.float().expand_as(t)  # noisy context: its t
            t = torch.cat([t_clean, t], 1)  # (B, 2f): the clean half at t = 0 (or its context noise level)
            frames = torch.cat([frames, frames])
            cams = None if cams is None else (torch.cat([cams[0]] * 2, 1), torch.cat([cams[1]] * 2, 1))
            actions = None if actions is None else torch.cat([actions, actions], 1)
            n_frames = 2 * f
        vec = self.time_in(t)  # (B, n_frames, D)
        if actions is not None:
            vec = vec + self.action_in(actions)  # WorldPlay adds the action to the modulation vector
        rd = cfg.head_dim - cfg.inline_prope_dim
        pos = dict(rope=M.rope_tables(rd, frames, h, w, cfg.rope_theta, x.device, split=cfg.rope_split), cams=cams,
                   mask=None, mask_text=None, cache=cache, commit=commit, n_frames=n_frames)
        ckpt = self.grad_ckpt and torch.is_grad_enabled() and cache is None  # recompute each block in the backward
        run = lambda block, *a, **kw: checkpoint(block, *a, use_reentrant=False, **kw) if ckpt else block(*a, **kw)
        if clean is None and cache is None:  # bidirectional: the two streams attend to each other in every block
            txt = self.embed_text(context, t_clip, context_2, image_embeds)  # (B, L, D)
            vec_txt = self.time_in(t_clip)[:, None]  # (B, 1, D)
            for i, block in enumerate(self.double_blocks):
                img, txt = run(block, img, vec, pos, i, txt=txt, vec_txt=vec_txt)
        else:
            text_kv = self.text_stream(context, cache, context_2, image_embeds)
            if clean is not None:
                L, args = text_kv[0][0].shape[2], (f, cfg.chunk // pt or 1, h * w)
                if self.flex if self.flex is not None else x.is_cuda:
                    pos["mask"] = M.teacher_forcing_block_mask(*args, x.device, sink, window)
                    pos["mask_text"] = teacher_forcing_text_block_mask(*args, L, x.device, sink, window)
                else:
                    pos["mask"] = M.teacher_forcing_mask(*args, x.device, sink, window)  # (2N, 2N)
                    pos["mask_text"] = torch.cat([pos["mask"], pos["mask"].new_ones(len(pos["mask"]), L)], 1)
            for i, block in enumerate(self.double_blocks):
                img, _ = run(block, img, vec, pos, i, text_kv=text_kv[i])
        if cache is not None and commit:
            cache.advance(f)
            if cameras is not None:
                cache.last_w2c = cameras.w2c[:, -1]
        out = self.final_layer(img, vec, n_frames)  # (B, N, C*pt*ph*pw), channel-major per token (HY's unpatchify)
        if clean is not None:
            out = out[:, out.shape[1] // 2:]
        out = out.view(B, f, h, w, C, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(B, C, F_, H, W).to(x.dtype)  # the samplers keep latents in x's dtype (fp32)

    def new_cache(self, batch, height, width, sink=M.TRAIN_SINK, window=64, device=None, dtype=None):
        """A KV cache for latents of (height, width); sink + window in latent frames; dtype: the model's."""
        dtype = dtype or self.img_in.proj.weight.dtype
        tpf = (height // self.cfg.patch_size[1]) * (width // self.cfg.patch_size[2])
        return MMKVCache(self.cfg, batch, tpf, sink, window, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# 5. loading: HY1.5 original / diffusers names, WorldPlay, minWM; the config from the tensor shapes

# diffusers HunyuanVideo15Transformer3DModel name -> original HY1.5 name (first match wins); the refiner's
# to_q / to_k / to_v are concatenated into self_attn_qkv, and norm_out's (scale, shift) swapped to (shift, scale)
_DIFFUSERS_TO_HY = [
    (r"^time_embed\.timestep_embedder\.linear_([12])\.", lambda m: f"time_in.mlp.{2 * int(m[1]) - 2}."),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_([12])\.",
     lambda m: f"txt_in.t_embedder.mlp.{2 * int(m[1]) - 2}."),
    (r"^context_embedder\.time_text_embed\.text_embedder\.", "txt_in.c_embedder."),
    (r"^context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])\.",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_qkv.\2."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0\.",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_proj."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0\.proj\.",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc1."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2\.",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc2."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear\.",
     r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(norm[12])\.",
     r"txt_in.individual_token_refiner.blocks.\1.\2."),
    (r"^context_embedder_2\.norm\.", "byt5_in.layernorm."),
    (r"^context_embedder_2\.linear_([123])\.", r"byt5_in.fc\1."),
    (r"^image_embedder\.norm_in\.", "vision_in.proj.0."),
    (r"^image_embedder\.linear_1\.", "vision_in.proj.1."),
    (r"^image_embedder\.linear_2\.", "vision_in.proj.3."),
    (r"^image_embedder\.norm_out\.", "vision_in.proj.4."),
    (r"^x_embedder\.proj\.", "img_in.proj."),
    (r"^cond_type_embed\.", "cond_type_embedding."),
    (r"^transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.linear."),
    (r"^transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.linear."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_([qkv])\.", r"double_blocks.\1.img_attn_\2."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_([qk])\.", r"double_blocks.\1.img_attn_\2_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn_proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.", r"double_blocks.\1.txt_attn_\2."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.", r"double_blocks.\1.txt_attn_\2_norm."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn_proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.fc1."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.fc2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.fc1."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.fc2."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"^proj_out\.", "final_layer.linear."),
]


def diffusers_to_hy(sd):
    """A diffusers HunyuanVideo15Transformer3DModel state dict -> original HY1.5 names (keys it does not
    know pass through unchanged, e.g. WorldPlay's action_in / img_attn_prope_proj)."""
    out = M.rename_keys(sd, _DIFFUSERS_TO_HY)
    for k in [k for k in out if ".self_attn_qkv.q." in k]:  # the refiner's fused qkv: rows q | k | v
        stem, leaf = k.split(".self_attn_qkv.q.")
        parts = [out.pop(f"{stem}.self_attn_qkv.{p}.{leaf}") for p in "qkv"]
        out[f"{stem}.self_attn_qkv.{leaf}"] = torch.cat(parts, 0)
    for k in ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        if k in out:  # diffusers' AdaLayerNormContinuous stores (scale, shift); the original (shift, scale)
            scale, shift = out[k].chunk(2, 0)
            out[k] = torch.cat([shift, scale], 0)
    return out


def is_mmdit(sd):
    """True for a HunyuanVideo-1.5 / HY-WorldPlay state dict, original or diffusers names."""
    return any(k.startswith("double_blocks.") for k in sd) or (
        "x_embedder.proj.weight" in sd and any(k.startswith("context_embedder.token_refiner.") for k in sd))


def config_from(sd, cfg_json, kind, overrides):
    """MMDiTConfig from a minWM JSON, or from the shapes of an original-layout state dict (+ a diffusers or
    release config.json for the RoPE split and theta)."""
    names = {f.name for f in fields(MMDiTConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"not MMDiT settings: {', '.join(unknown)}")
    if kind == "minwm":
        return MMDiTConfig(**{**{k: v for k, v in cfg_json.items() if k in names}, **overrides})
    for key in ("img_in.proj.weight", "final_layer.linear.weight", "double_blocks.0.img_attn_q_norm.weight",
                "txt_in.input_embedder.weight", "time_in.mlp.0.weight"):
        if key not in sd:
            raise ValueError(f"a HunyuanVideo-1.5 / HY-WorldPlay checkpoint without {key} (incomplete?)")
    pw = sd["img_in.proj.weight"]  # (dim, in, pt, ph, pw)
    dim, in_ch, patch = pw.shape[0], pw.shape[1], tuple(pw.shape[2:])
    out_ch = sd["final_layer.linear.weight"].shape[0] // math.prod(patch)
    count = lambda prefix: 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))
    js = cfg_json or {}
    axes = js.get("rope_axes_dim") or js.get("rope_dim_list") or ()
    branch = any("img_attn_prope_proj" in k for k in sd)
    cfg = dict(dim=dim, num_heads=dim // sd["double_blocks.0.img_attn_q_norm.weight"].shape[0],
               num_layers=count("double_blocks."), refiner_layers=count("txt_in.individual_token_refiner.blocks."),
               mlp_ratio=sd["double_blocks.0.img_mlp.fc1.weight"].shape[0] / dim, in_channels=in_ch,
               out_channels=out_ch, patch_size=patch, text_dim=sd["txt_in.input_embedder.weight"].shape[1],
               byt5_dim=sd["byt5_in.fc1.weight"].shape[1] if "byt5_in.fc1.weight" in sd else 0,
               vision_dim=sd["vision_in.proj.1.weight"].shape[1] if "vision_in.proj.1.weight" in sd else 0,
               rope_theta=float(js.get("rope_theta", 256.0)), rope_axes=tuple(axes),
               image_cond=in_ch == 2 * out_ch + 1, prope="branch" if branch else "none",
               prope_text=branch,  # a file with the branch is WorldPlay's, whose branch attends to the text too
               action="action_in.mlp.0.weight" in sd)
    return MMDiTConfig(**{**cfg, **overrides})


def from_state_dict(sd, cfg_json, kind, source, overrides):
    """The MMDiT of a state dict read by model.load_pretrained (diffusers names converted first)."""
    if any(k.startswith(("single_blocks.", "single_transformer_blocks.")) for k in sd):
        raise ValueError(f"{source}: a HunyuanVideo (v1) checkpoint with single-stream blocks; only "
                         f"HunyuanVideo-1.5 / HY-WorldPlay (double-stream blocks only) are supported")
    if "x_embedder.proj.weight" in sd:
        sd = diffusers_to_hy(sd)
    try:
        cfg = config_from(sd, cfg_json, kind, overrides)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    net = MMDiT(cfg)
    allow = ()  # parts added on top of a base model start zero-initialized (step 0 == the base model)
    if cfg.prope == "branch" and not any("img_attn_prope_proj" in k for k in sd):
        allow += ("img_attn_prope_proj",)
    if cfg.action and not any(k.startswith("action_in.") for k in sd):
        allow += ("action_in.",)
    return M.load_state(net, sd, source, allow_missing=allow)
