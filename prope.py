"""PRoPE: projective positional encoding of cameras inside self-attention (GTA form).

Each camera token i (a latent patch of frame f) carries the frame's projective matrix

    P_i = lift(K_i) · T_i,     lift(K) = [[K, 0], [0, 1]] (4x4),  T_i = w2c (4x4, OpenCV axes)

and each 4-channel group of a head's q, k, v, o is multiplied by the same 4x4 matrix:

    q'_i = P_iᵀ q_i        k'_j = P_j⁻¹ k_j        v'_j = P_j⁻¹ v_j        o_i = P_i · o'_i

so that the attention logit q'_iᵀ k'_j = q_iᵀ (P_i P_j⁻¹) k_j depends only on the *relative*
projective transform between the two frames. A global change of world frame T -> T·G cancels
(P_i G G⁻¹ P_j⁻¹), a change of translation scale does not: all poses must share one metric scale.

Inverses are closed form: T⁻¹ = [[Rᵀ, -Rᵀt], [0, 1]] for a rigid w2c, and K⁻¹ from (fx, fy, cx, cy).
Intrinsics are normalized: K = [fx/W, fy/H, cx/W, cy/H], so the encoding does not depend on the
latent resolution.
"""
from dataclasses import dataclass

import torch


@dataclass
class Cameras:
    w2c: torch.Tensor  # (B, F, 4, 4) world-to-camera, OpenCV axes (+x right, +y down, +z forward)
    K: torch.Tensor  # (B, F, 4) normalized [fx/W, fy/H, cx/W, cy/H]

    def __post_init__(self):
        if self.w2c.ndim != 4 or self.w2c.shape[-2:] != (4, 4):
            raise ValueError(f"Cameras.w2c must be (B, F, 4, 4), got {tuple(self.w2c.shape)}")
        if self.K.shape != self.w2c.shape[:2] + (4,):
            raise ValueError(f"Cameras.K must be (B, F, 4) = {tuple(self.w2c.shape[:2]) + (4,)}, "
                             f"got {tuple(self.K.shape)}")

    @property
    def num_frames(self):
        return self.w2c.shape[1]

    def to(self, *args, **kwargs):
        return Cameras(self.w2c.to(*args, **kwargs), self.K.to(*args, **kwargs))

    def frames(self, start, stop):
        """The cameras of latent frames [start, stop)."""
        return Cameras(self.w2c[:, start:stop], self.K[:, start:stop])

    def matrices(self):
        """(P, P⁻¹), each (B, F, 4, 4) in float32 — the only place PRoPE's algebra happens."""
        w2c, K = self.w2c.float(), self.K.float()
        fx, fy, cx, cy = K.unbind(-1)  # each (B, F)
        z, o = torch.zeros_like(fx), torch.ones_like(fx)
        lift = torch.stack([fx, z, cx, z, z, fy, cy, z, z, z, o, z, z, z, z, o], -1).unflatten(-1, (4, 4))
        lift_inv = torch.stack([1 / fx, z, -cx / fx, z, z, 1 / fy, -cy / fy, z,
                                z, z, o, z, z, z, z, o], -1).unflatten(-1, (4, 4))
        R, t = w2c[..., :3, :3], w2c[..., :3, 3:]  # (B, F, 3, 3), (B, F, 3, 1)
        w2c_inv = torch.zeros_like(w2c)
        w2c_inv[..., :3, :3] = R.transpose(-1, -2)
        w2c_inv[..., :3, 3:] = -R.transpose(-1, -2) @ t
        w2c_inv[..., 3, 3] = 1
        return lift @ w2c, w2c_inv @ lift_inv


def apply(x, mats):
    """Multiply each 4-channel group of x by its frame's 4x4 matrix (the I⊗M of the docstring).

    x: (B, H, N, D) with N = F * tokens_per_frame and D % 4 == 0; mats: (B, F, 4, 4).
    q' = apply(q, P.mT), k' = apply(k, P_inv), v' = apply(v, P_inv), o = apply(o', P).
    """
    B, H, N, D = x.shape
    F = mats.shape[1]
    y = x.float().reshape(B, H, F, N // F, D // 4, 4)
    y = torch.einsum("bfij,bhfndj->bhfndi", mats.float(), y)
    return y.reshape(B, H, N, D).to(x.dtype)
