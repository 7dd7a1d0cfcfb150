"""Cameras: the camera file formats, action strings, the scale policy, and a picture of a path.

Every path becomes a `prope.Cameras(w2c (B, F, 4, 4), K (B, F, 4))` with B = 1: world-to-camera
matrices in OpenCV axes (+x right, +y down, +z forward) made relative to frame 0
(w2c_rel_f = w2c_f · w2c_0⁻¹, so frame 0 is the identity) and intrinsics normalized by the frame size,
K = [fx/W, fy/H, cx/W, cy/H]. `load_cameras` reads four sources:

  JSON v1        {"convention": "opencv", "pose": "w2c" | "c2w", "width", "height", "fps",
                  "frames": [{"K_norm": [4] or "K": 3x3 pixels (needs width/height), "w2c" | "c2w": 4x4}]}
  HY-WorldPlay   {"0": {"extrinsic": 4x4 c2w, "K": 3x3 pixels}, "1": ...}, one entry per latent frame;
                 K is in the pixels of the file's own video, whose size is inferred as W = 2·cx, H = 2·cy.
  RealEstate10K  a URL line, then `timestamp fx fy cx cy k1 k2 <3x4 w2c row-major>` per frame
                 (fx..cy already normalized; k1 k2 ignored).
  action string  "w*8,j*4,d*2": one step per latent frame, N steps give N + 1 frames, frame 0 = identity.

A string is a path if it ends in .json/.txt or names an existing file; otherwise it is an action string.
Malformed input raises ValueError with a one-line message naming the field and the frame.

Actions drive the camera like a first-person game, from its current position and heading:
  w / s  forward / back: along the camera's +z / -z heading, kept horizontal   (trans_step metres)
  d / a  right / left: along the camera's +x / -x, kept horizontal
  u / n  up / down: along the vertical (-y / +y, OpenCV's y points down)
  l / j  yaw right / left by rot_step degrees about the vertical: +z turns towards +x, so image
         content moves LEFT under "l"
  i / k  pitch up / down by rot_step about the camera's x axis: +z turns towards -y (up)
  x      stay (no motion; for "stand still" and "move then stop" clips)
"The vertical" is frame 0's -y axis tilted up by pitch0 degrees (frame 0 looks pitch0 below the
horizon: 0 for a level first frame, START_PITCH for the procedural world), so turns never roll the
horizon. With pitch0 = 0 and no pitch action, "w" moves exactly along the camera's +z. Letters
written together ("wl") act in the same step, in the order written. `mirror_cameras` swaps l/j and
d/a.

Scale. PRoPE is invariant to a change of world frame but not to scale, so one function,
`normalize_scale`, holds the policy: "metric" keeps metres (procedural world, action strings, JSON v1
files, which we write from metric paths) and "per_clip" divides translations so the farthest camera
is 1 from frame 0 (data of unknown scale: RealEstate10K, HY-WorldPlay, real videos in `prepare`).
`load_cameras(..., scale=)` overrides the default of each format.

`save_cameras` writes JSON v1, `plot_trajectory` draws a path from above (PNG), `perturb_cameras` jitters
poses like perception-estimated ones (the camera-quality ablation).
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from common import atomic_write
from prope import Cameras

TRANSLATE = {"w": (0, 0, 1), "s": (0, 0, -1), "d": (1, 0, 0), "a": (-1, 0, 0), "u": (0, -1, 0), "n": (0, 1, 0)}
YAW, PITCH = {"l": 1, "j": -1}, {"i": 1, "k": -1}  # turn right / up by +rot_step
ACTIONS = "wsdaunljikx"


def rotation(axis, angle):
    """Right-handed rotation (3, 3) about the camera's x (axis 0) or y (axis 1) axis."""
    c, s = math.cos(angle), math.sin(angle)
    if axis == 0:
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rigid_inverse(T):
    """Closed-form inverse of rigid 4x4 matrices (..., 4, 4), numpy or torch."""
    inv = T * 0
    R, t = T[..., :3, :3], T[..., :3, 3:]
    Rt = R.swapaxes(-1, -2) if isinstance(T, np.ndarray) else R.mT
    inv[..., :3, :3] = Rt
    inv[..., :3, 3:] = -Rt @ t
    inv[..., 3, 3] = 1
    return inv


def default_K(frames, width=1, height=1):
    """(frames, 4) normalized intrinsics: 64° horizontal field of view, square pixels, centred."""
    fx = 0.8  # 2·atan(0.5 / 0.8) = 64°
    return torch.tensor([fx, fx * width / height, 0.5, 0.5]).repeat(frames, 1)


def normalize_scale(cameras, policy):
    """The translation-scale policy, in one place (PRoPE sees absolute translations).

    "metric": keep translations as they are (metres). Default for the procedural world, action
    strings and JSON v1 files. "per_clip": divide every translation by the largest camera distance
    from frame 0, so the farthest camera is 1 away; a camera that never moves is left unchanged.
    Default for data of unknown scale: RealEstate10K, HY-WorldPlay poses, real videos in `prepare`.
    """
    if policy == "metric":
        return cameras
    if policy != "per_clip":
        raise ValueError(f'scale: unknown policy {policy!r} (use "metric" or "per_clip")')
    w2c = cameras.w2c.clone()
    R, t = w2c[..., :3, :3], w2c[..., :3, 3]
    centres = -(R.mT @ t[..., None])[..., 0]  # (B, F, 3) camera centres in the world
    dist = (centres - centres[:, :1]).norm(dim=-1).amax(dim=1)  # (B,)
    dist = torch.where(dist > 1e-6, dist, torch.ones_like(dist))
    w2c[..., :3, 3] = t / dist[:, None, None]  # scaling the world by 1/d scales t = -R·c by 1/d
    return Cameras(w2c, cameras.K)


def mirror_cameras(cameras):
    """The mirror image of a path across the camera's x axis: w2c -> M·w2c·M, M = diag(-1, 1, 1, 1).

    Rotations stay rigid (det(MRM) = det R); left turns become right turns, left strafes right ones;
    paths straight ahead, up/down and in pitch are their own mirror. K is kept.
    """
    M = torch.diag(torch.tensor([-1.0, 1, 1, 1], dtype=cameras.w2c.dtype))
    return Cameras(M @ cameras.w2c @ M, cameras.K.clone())


MAX_STEPS = 100_000  # action steps in one string: hours of video at 16 fps, and a bound on memory


def parse_actions(actions, max_steps=MAX_STEPS):
    """"w*2,dl" -> ["w", "w", "dl"]: the letters acting in each step (at most max_steps, checked
    before the list is built, so "w*999999999" from a browser costs nothing)."""
    if not actions.strip():
        raise ValueError('actions "": empty action string')
    steps = []
    for n, token in enumerate(actions.split(",")):
        token = token.strip()
        where = f'actions "{actions}": token {n} "{token}" (frame {len(steps) + 1})'
        letters, star, count = token.partition("*")
        if not letters:
            raise ValueError(f"{where}: no action letter")
        for ch in letters:
            if ch not in ACTIONS:
                raise ValueError(f"{where}: unknown action letter {ch!r} (known: {ACTIONS})")
        if star and not (count.isascii() and count.isdigit() and int(count) > 0):  # "²".isdigit() is True
            raise ValueError(f"{where}: repeat count must be a positive integer, got {count!r}")
        n_new = int(count) if star else 1
        if max_steps is not None and len(steps) + n_new > max_steps:
            raise ValueError(f'actions "{actions}": more than {max_steps} steps')
        steps += [letters] * n_new
    return steps


def actions_to_cameras(actions, trans_step=0.25, rot_step=5.0, width=1, height=1, pitch0=0.0):
    """An action string -> Cameras (1, steps + 1) in metres; frame 0 is the identity.

    As in a first-person game, yaw turns about the vertical and w/s/a/d move horizontally along the
    current heading, so the horizon stays level and the height changes only by u/n; pitch tilts the
    view. pitch0: degrees frame 0 looks below the horizon (0: a level first frame; the procedural
    world's start pose looks START_PITCH down).
    """
    walk = Walker(trans_step, rot_step, pitch0)
    w2c = [walk.w2c0] + [walk.step(letters) for letters in parse_actions(actions)]
    return _relative(w2c, default_K(len(w2c), width, height).numpy())


class Walker:
    """The first-person pose of `actions_to_cameras`, carried from step to step.

    A game of any length (play.py, infer.py --interactive) asks for the cameras of the next chunk
    only: `cameras(steps)` walks on from where the last call stopped, so each frame costs O(1)
    instead of re-walking the whole path. Its poses are the same numbers as `actions_to_cameras`'s
    (the same code makes both), so a played game equals `infer.py --actions` of its steps.
    """

    def __init__(self, trans_step=0.25, rot_step=5.0, pitch0=0.0):
        self.trans_step, self.rot_step = trans_step, math.radians(rot_step)
        self.pos, self.yaw, self.pitch = np.zeros(3), 0.0, -math.radians(pitch0)
        self.w2c0 = self.w2c()  # frame 0: every pose is made relative to it
        self.started = False  # frame 0 handed out yet

    def w2c(self):
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = rotation(1, self.yaw) @ rotation(0, self.pitch), self.pos
        return rigid_inverse(c2w)

    def step(self, letters):
        """Act one step ("w", "wl", ...; letters in the order written); returns the new w2c (4, 4)."""
        for ch in letters:
            if ch in TRANSLATE:
                self.pos = self.pos + self.trans_step * rotation(1, self.yaw) @ np.array(TRANSLATE[ch], dtype=float)
            self.yaw += YAW.get(ch, 0) * self.rot_step
            self.pitch += PITCH.get(ch, 0) * self.rot_step
        return self.w2c()

    def cameras(self, steps, width=1, height=1):
        """Cameras (1, n) of the next frames, relative to frame 0: on the first call frame 0 and the
        frames these steps reach (n = len(steps) + 1, like an action string), then the steps' frames."""
        w2c = [self.w2c0] + [self.step(letters) for letters in steps]
        cams = _relative(w2c, default_K(len(w2c), width, height).numpy())
        first, self.started = (1 if self.started else 0), True
        return cams.frames(first, len(w2c))


def _numbers(value, where, shape):
    """A nested list of numbers -> float64 array of `shape`, or a ValueError naming `where`."""
    arr = np.array(value, dtype=object)
    if arr.shape != shape:
        want = "x".join(map(str, shape))
        raise ValueError(f"{where}: expected {want} numbers, got shape {arr.shape}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arr.flat):
        raise ValueError(f"{where}: all entries must be numbers")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: entries must be finite (found NaN or inf)")
    return arr


MAX_TRANSLATION = 1e4  # metres (or units of a normalized clip): beyond it a pose is a unit error or garbage


def _check_pose(T, where):
    if np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise ValueError(f"{where}: last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    R = T[:3, :3]
    err = np.abs(R.T @ R - np.eye(3)).max()
    if err > 1e-3:  # loose enough for poses printed with 6 digits
        raise ValueError(f"{where}: rotation is not orthonormal (|RᵀR - I| = {err:.2g})")
    if np.linalg.det(R) < 0:
        raise ValueError(f"{where}: rotation has det -1 (a reflection, not a rotation)")
    if np.abs(T[:3, 3]).max() > MAX_TRANSLATION:
        raise ValueError(f"{where}: translation {np.abs(T[:3, 3]).max():.3g} is beyond {MAX_TRANSLATION:g} "
                         f"(a unit error?)")
    return T


def _check_K(k, where):
    """Normalized intrinsics [fx, fy, cx, cy]: a field of view between about 0.1° and 179°, a principal
    point inside the frame; anything else gives black or meaningless frames, so it is refused."""
    if not (0.003 <= k[0] <= 500 and 0.003 <= k[1] <= 500):
        raise ValueError(f"{where}: focal length must be positive and sane (0.003..500 of the frame size), "
                         f"got fx={k[0]:.4g}, fy={k[1]:.4g}")
    if not (0 <= k[2] <= 1 and 0 <= k[3] <= 1):
        raise ValueError(f"{where}: principal point must lie in the frame (0..1 of its size), got cx={k[2]:.4g}, "
                         f"cy={k[3]:.4g}")
    return k


def _pixel_K(K, W, H):
    return np.array([K[0, 0] / W, K[1, 1] / H, K[0, 2] / W, K[1, 2] / H])  # skew is ignored


def _relative(w2c, K):
    """Stacked float64 poses -> Cameras relative to frame 0 (frame 0 exactly the identity)."""
    w2c = np.stack(w2c) @ rigid_inverse(w2c[0])
    w2c[0] = np.eye(4)
    return Cameras(torch.tensor(w2c, dtype=torch.float32)[None], torch.tensor(np.stack(K), dtype=torch.float32)[None])


def _load_v1(doc, name, width, height):
    if doc.get("convention") != "opencv":
        raise ValueError(f'{name}: convention: unknown convention {doc.get("convention")!r} (must be "opencv")')
    kind = doc.get("pose")
    if kind not in ("w2c", "c2w"):
        raise ValueError(f'{name}: pose: unknown pose kind {kind!r} (must be "w2c" or "c2w")')
    if "frames" not in doc:
        raise ValueError(f"{name}: frames: missing")
    frames = doc["frames"]
    if not isinstance(frames, list) or not frames:
        raise ValueError(f"{name}: frames: must be a non-empty list of frames")
    W, H = doc.get("width", width), doc.get("height", height)
    w2c, K = [], []
    for i, frame in enumerate(frames):
        where = f"{name}: frames[{i}]"
        if not isinstance(frame, dict):
            raise ValueError(f"{where}: must be an object")
        if kind not in frame:
            raise ValueError(f"{where}.{kind}: missing")
        T = _check_pose(_numbers(frame[kind], f"{where}.{kind}", (4, 4)), f"{where}.{kind}")
        w2c.append(T if kind == "w2c" else rigid_inverse(T))
        if "K_norm" in frame:
            K.append(_check_K(_numbers(frame["K_norm"], f"{where}.K_norm", (4,)), f"{where}.K_norm"))
        elif "K" in frame:
            Kpix = _numbers(frame["K"], f"{where}.K", (3, 3))
            if not all(isinstance(v, (int, float)) and v > 0 for v in (W, H)):
                raise ValueError(f"{where}.K: pixel intrinsics need positive top-level width and height")
            K.append(_check_K(_pixel_K(Kpix, W, H), f"{where}.K"))
        else:
            raise ValueError(f"{where}.K_norm: missing (give K_norm or pixel K)")
    return _relative(w2c, K)


def _load_worldplay(doc, name, width, height):
    for i in range(len(doc)):
        if str(i) not in doc:
            raise ValueError(f'{name}: ["{i}"]: missing (keys must be consecutive frame numbers from "0")')
    w2c, K = [], []
    for i in range(len(doc)):
        where = f'{name}: ["{i}"]'
        entry = doc[str(i)]
        for key in ("extrinsic", "K"):
            if not isinstance(entry, dict) or key not in entry:
                raise ValueError(f"{where}.{key}: missing")
        c2w = _check_pose(_numbers(entry["extrinsic"], f"{where}.extrinsic", (4, 4)), f"{where}.extrinsic")
        w2c.append(rigid_inverse(c2w))
        Kpix = _numbers(entry["K"], f"{where}.K", (3, 3))
        # the file names no frame size and its K is in the pixels of the video it came with, whatever
        # size we generate at: that video's size, from a centred principal point
        W, H = 2 * Kpix[0, 2], 2 * Kpix[1, 2]
        if W <= 0 or H <= 0:
            raise ValueError(f"{where}.K: principal point must be positive to infer the frame size")
        K.append(_check_K(_pixel_K(Kpix, W, H), f"{where}.K"))
    return _relative(w2c, K)


def _load_re10k(text, name):
    lines = [(n + 1, line.split()) for n, line in enumerate(text.splitlines()) if line.strip()]
    if len(lines[0][1]) == 1:
        lines = lines[1:]  # the video URL
    if not lines:
        raise ValueError(f"{name}: line 2: no camera lines after the URL")
    w2c, K = [], []
    for i, (n, fields) in enumerate(lines):
        where = f"{name}: line {n} (frame {i})"
        if len(fields) != 19:
            raise ValueError(f"{where}: expected 19 fields (timestamp fx fy cx cy k1 k2, 3x4 w2c), got {len(fields)}")
        try:
            nums = np.array([float(v) for v in fields])
        except ValueError:
            raise ValueError(f"{where}: all fields must be numbers") from None
        if not np.isfinite(nums).all():
            raise ValueError(f"{where}: fields must be finite (found NaN or inf)")
        K.append(_check_K(nums[1:5], f"{where} fx fy"))
        w2c.append(_check_pose(np.vstack([nums[7:].reshape(3, 4), [0, 0, 0, 1]]), f"{where} w2c"))
    return _relative(w2c, K)


def load_cameras(src, trans_step=0.25, rot_step=5.0, width=None, height=None, scale=None, pitch0=0.0):
    """A camera file (JSON v1, HY-WorldPlay, RealEstate10K txt) or an action string -> Cameras (1, F).

    width/height fill in a frame size the file lacks (pixel K); for action strings they set K's aspect.
    trans_step, rot_step, pitch0: see `actions_to_cameras` (pitch0=START_PITCH for the procedural world).
    scale: None (the format's default, see `normalize_scale`), "metric" or "per_clip".
    """
    s = str(src)
    if os.path.isdir(s):
        raise ValueError(f"{s}: is a folder, not a camera file or an action string")
    if isinstance(src, Path) or s.endswith((".json", ".txt")) or os.path.isfile(s):
        path = Path(s)
        if not path.is_file():
            raise ValueError(f"{path.name}: file not found ({path})")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text camera file (binary content)") from None
        if not text.strip():
            raise ValueError(f"{path.name}: file is empty")
        if path.suffix == ".json" or text.lstrip().startswith("{"):
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path.name}: invalid JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path.name}: top level must be a JSON object")
            if doc and all(key.isdigit() for key in doc):
                return normalize_scale(_load_worldplay(doc, path.name, width, height), scale or "per_clip")
            return normalize_scale(_load_v1(doc, path.name, width, height), scale or "metric")
        return normalize_scale(_load_re10k(text, path.name), scale or "per_clip")
    for name, value in (("trans_step", trans_step), ("rot_step", rot_step), ("pitch0", pitch0)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not 0 <= trans_step <= 100 or not 0 <= abs(rot_step) <= 180:
        raise ValueError(f"step sizes out of range: trans_step {trans_step} (0..100 m), rot_step {rot_step} (0..180°)")
    cameras = actions_to_cameras(s, trans_step, rot_step, width or 1, height or 1, pitch0)
    return normalize_scale(cameras, scale or "metric")


def _short(x):
    return [float(str(v)) for v in np.asarray(x, dtype=np.float32).reshape(-1)]  # shortest float32 repr


def save_cameras(path, cameras, width=None, height=None, fps=None):
    """Write the first path of `cameras` as a JSON v1 file (w2c), one frame per line, atomically."""
    head = {"convention": "opencv", "pose": "w2c"}
    head.update({k: v for k, v in (("width", width), ("height", height), ("fps", fps)) if v is not None})
    frames = [json.dumps({"K_norm": _short(k), "w2c": np.array(_short(T)).reshape(4, 4).tolist()})
              for k, T in zip(cameras.K[0].numpy(), cameras.w2c[0].numpy())]
    text = json.dumps(head)[:-1] + ', "frames": [\n  ' + ",\n  ".join(frames) + "\n]}\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------
# a picture of a path


def plot_trajectory(cameras, path_png, title=None, size=384):
    """Top-down PNG (x right, z up the image) of camera positions and viewing directions, by PIL."""
    from PIL import Image, ImageDraw
    c2w = rigid_inverse(cameras.w2c[0].double())
    pos, fwd = c2w[:, [0, 2], 3].numpy(), c2w[:, [0, 2], 2].numpy()  # (F, 2) x, z of centres and +z axes
    lo, hi = pos.min(0), pos.max(0)
    span = max((hi - lo).max(), 1.0) * 1.25  # metres shown across the plot
    scale, mid = (size - 80) / span, (lo + hi) / 2
    px = lambda p: (size / 2 + (p[0] - mid[0]) * scale, size / 2 + 10 - (p[1] - mid[1]) * scale)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    step = 10 ** math.floor(math.log10(span / 2))  # grid of round metres
    first = np.floor((mid - span) / step) * step
    for k in range(int(2 * span / step) + 2):
        x, y = px(first + k * step)  # a grid crossing: a vertical and a horizontal line through it
        draw.line([(x, 0), (x, size)], fill=(228, 228, 228))
        draw.line([(0, y), (size, y)], fill=(228, 228, 228))
    draw.line([px(p) for p in pos], fill=(150, 150, 150), width=2)
    arrow = span * 0.07
    for f, (p, v) in enumerate(zip(pos, fwd)):
        r = f / max(len(pos) - 1, 1)
        colour = (int(40 + 200 * r), 60, int(220 - 180 * r))  # blue at the start, red at the end
        n = np.linalg.norm(v)
        v = v / n if n > 1e-6 else np.array([0.0, 1.0])  # looking straight up or down: draw +z
        a, b = px(p), px(p + arrow * v)
        draw.line([a, b], fill=colour, width=2)
        side = np.array([-v[1], v[0]])
        for s in (1, -1):  # arrow head
            draw.line([b, px(p + arrow * (0.7 * v + 0.2 * s * side))], fill=colour, width=2)
        draw.ellipse([a[0] - 3, a[1] - 3, a[0] + 3, a[1] + 3], fill=colour)
    draw.text((8, 6), title or f"{len(pos)} cameras, top view", fill="black")
    draw.text((8, size - 18), f"grid {step:g}   x ->  right, z ^ up   blue = first, red = last", fill=(90, 90, 90))
    img.save(path_png)


# ----------------------------------------------------------------------------------------------
# the camera-quality ablation


def perturb_cameras(w2c, std, generator, scale_drift=0.0):
    """Ablation (--camera_noise, --camera_scale_drift): poses of frames 1.. as perception would estimate them.

    w2c (F, 4, 4). Jitter: rotations by ~std radians about a random axis, translations by ~std metres,
    independently per frame. Scale drift (monocular reconstruction has no metric scale, and its error
    grows along a path): every translation scaled by 1 + e·f/(F-1), e ~ N(0, scale_drift) per clip.
    Frame 0 stays the identity.
    """
    F_ = w2c.shape[0]
    axis = torch.randn(F_, 3, generator=generator)
    angle = std * torch.randn(F_, generator=generator)
    k = axis / axis.norm(dim=-1, keepdim=True)
    Kx = torch.zeros(F_, 3, 3)
    Kx[:, 0, 1], Kx[:, 0, 2], Kx[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    Kx = Kx - Kx.mT
    a = angle[:, None, None]
    R = torch.eye(3) + a.sin() * Kx + (1 - a.cos()) * Kx @ Kx  # Rodrigues
    J = torch.eye(4).repeat(F_, 1, 1)
    J[:, :3, :3], J[:, :3, 3] = R, std * torch.randn(F_, 3, generator=generator)
    J[0] = torch.eye(4)  # frame 0 stays the identity
    out = J @ w2c
    if scale_drift > 0:
        e = scale_drift * torch.randn((), generator=generator)
        out[:, :3, 3] *= (1 + e * torch.arange(F_) / max(F_ - 1, 1))[:, None]
    return out
