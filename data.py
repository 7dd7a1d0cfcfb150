"""Data for minWM: camera paths, the procedural world, captions, latent codecs and real-video caches.

Cameras
-------
Every path becomes a `prope.Cameras(w2c (B, F, 4, 4), K (B, F, 4))` with B = 1: world-to-camera
matrices in OpenCV axes (+x right, +y down, +z forward) made relative to frame 0
(w2c_rel_f = w2c_f · w2c_0⁻¹, so frame 0 is the identity) and intrinsics normalized by the frame size,
K = [fx/W, fy/H, cx/W, cy/H]. `load_cameras` reads four sources:

  JSON v1        {"convention": "opencv", "pose": "w2c" | "c2w", "width", "height", "fps",
                  "frames": [{"K_norm": [4] or "K": 3x3 pixels (needs width/height), "w2c" | "c2w": 4x4}]}
  HY-WorldPlay   {"0": {"extrinsic": 4x4 c2w, "K": 3x3 pixels}, "1": ...}, one entry per latent frame;
                 the frame size comes from width=/height= or is inferred as W = 2·cx, H = 2·cy.
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

The procedural world
--------------------
The embedded default dataset: a textured ground plane (y = 0, world axes = OpenCV axes, so heights
are -y), a sky and 4-7 coloured spheres and boxes, ray cast in torch for any camera. Every scene has a
start pose 1.5 m above the ground pitched 20° down, so ground fills ~60-80% of the view (72% on
average; a sky-heavy view makes "repeat frame 0" a strong baseline and hides control). Cameras passed to `render_world` are
relative to it: world w2c = w2c_rel · w2c_start. The ground texture is big (1-2 m) cells of two
moderately contrasted colours with per-cell and smooth low-frequency colour variation, faded to its
mean colour where a pixel covers a cell (fine high-contrast texture pins every PSNR at a floor).
Object 0 always stands straight ahead; the others are spread around the start so that turning
reveals them. Scene seeds >= EVAL_SEED_BASE (10**9) are held out: training never produces them.
Training clips (`make_clip`, `make_batch`, `ProceduralWorld`) pair a scene with a random path of the
action vocabulary (`sample_trajectory`, 0.1-0.6 m and 2-10° per latent frame, fixed metric scale) and
a caption embedded by `text_embedding`; `eval_set` gives fixed held-out clips for the control metric.

Codecs map video (B, 3, T, H, W) in [-1, 1] to latents (B, C, F, h, w) and back: `PixelCodec`
(space-to-depth, exact) and `WanVAECodec` (Wan2.1's VAE with its latent normalization).

`python data.py bench` prints rendering speed; `python data.py prepare --src DIR --out DIR` caches
latents, cameras and text embeddings of real videos for `LatentDataset`.
"""
import argparse
import json
import math
import os
import re
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from prope import Cameras

# -----------------------------------------------------------------------------------------------
# cameras

TRANSLATE = {"w": (0, 0, 1), "s": (0, 0, -1), "d": (1, 0, 0), "a": (-1, 0, 0), "u": (0, -1, 0), "n": (0, 1, 0)}
YAW, PITCH = {"l": 1, "j": -1}, {"i": 1, "k": -1}  # turn right / up by +rot_step
ACTIONS = "wsdaunljikx"


def _rotation(axis, angle):
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


def parse_actions(actions):
    """"w*2,dl" -> ["w", "w", "dl"]: the letters acting in each step."""
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
        if star and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"{where}: repeat count must be a positive integer, got {count!r}")
        steps += [letters] * (int(count) if star else 1)
    return steps


def actions_to_cameras(actions, trans_step=0.25, rot_step=5.0, width=1, height=1, pitch0=0.0):
    """An action string -> Cameras (1, steps + 1) in metres; frame 0 is the identity.

    As in a first-person game, yaw turns about the vertical and w/s/a/d move horizontally along the
    current heading, so the horizon stays level and the height changes only by u/n; pitch tilts the
    view. pitch0: degrees frame 0 looks below the horizon (0: a level first frame; the procedural
    world's start pose looks START_PITCH down).
    """
    pos, yaw, pitch, w2c = np.zeros(3), 0.0, -math.radians(pitch0), []
    for letters in [""] + parse_actions(actions):
        for ch in letters:  # in the order written
            if ch in TRANSLATE:
                pos = pos + trans_step * _rotation(1, yaw) @ np.array(TRANSLATE[ch], dtype=float)
            yaw += YAW.get(ch, 0) * math.radians(rot_step)
            pitch += PITCH.get(ch, 0) * math.radians(rot_step)
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = _rotation(1, yaw) @ _rotation(0, pitch), pos
        w2c.append(rigid_inverse(c2w))
    return _relative(w2c, default_K(len(w2c), width, height).numpy())


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


def _check_pose(T, where):
    if np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise ValueError(f"{where}: last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    R = T[:3, :3]
    err = np.abs(R.T @ R - np.eye(3)).max()
    if err > 1e-3:  # loose enough for poses printed with 6 digits
        raise ValueError(f"{where}: rotation is not orthonormal (|RᵀR - I| = {err:.2g})")
    if np.linalg.det(R) < 0:
        raise ValueError(f"{where}: rotation has det -1 (a reflection, not a rotation)")
    return T


def _check_K(k, where):
    if k[0] <= 0 or k[1] <= 0:
        raise ValueError(f"{where}: focal length must be positive, got fx={k[0]:.4g}, fy={k[1]:.4g}")
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
        W, H = width or 2 * Kpix[0, 2], height or 2 * Kpix[1, 2]  # no size in the file: a centred principal point
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
    if isinstance(src, Path) or s.endswith((".json", ".txt")) or os.path.isfile(s):
        path = Path(s)
        if not path.is_file():
            raise ValueError(f"{path.name}: file not found ({path})")
        text = path.read_text()
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
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _write_atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


# -----------------------------------------------------------------------------------------------
# the procedural world

EVAL_SEED_BASE = 10**9  # scene seeds >= this are held out for evaluation
START_HEIGHT, START_PITCH = 1.5, 20.0  # metres above the ground, degrees below the horizon
SKY, GROUND = 0, 1  # render labels; object k gets label 2 + k
OBJECT_COLOURS = {"red": (0.85, 0.18, 0.15), "orange": (0.95, 0.55, 0.12), "yellow": (0.95, 0.85, 0.2),
                  "blue": (0.18, 0.32, 0.85), "purple": (0.55, 0.25, 0.72), "white": (0.93, 0.93, 0.9),
                  "pink": (0.95, 0.5, 0.68), "cyan": (0.2, 0.75, 0.82)}
GROUND_COLOURS = [("green", (0.36, 0.52, 0.26), "brown", (0.52, 0.4, 0.27)),
                  ("grey", (0.45, 0.45, 0.44), "tan", (0.62, 0.54, 0.4)),
                  ("olive", (0.45, 0.47, 0.24), "sand", (0.68, 0.62, 0.46)),
                  ("dark green", (0.24, 0.4, 0.24), "light green", (0.45, 0.62, 0.33))]
SUN = np.array([-0.4, -1.0, -0.3]) / np.linalg.norm([-0.4, -1.0, -0.3])  # towards the sun (up is -y)


def start_w2c():
    """(4, 4) world-to-camera of every scene's start pose: above the origin, facing +z, pitched down."""
    c2w = np.eye(4)
    c2w[:3, :3] = _rotation(0, -math.radians(START_PITCH))
    c2w[:3, 3] = [0, -START_HEIGHT, 0]
    return rigid_inverse(c2w)


def make_scene(scene_seed):
    """The deterministic description of one scene: ground colours, texture and 4-7 objects."""
    rng = np.random.default_rng(scene_seed)
    names = list(OBJECT_COLOURS)
    ground = GROUND_COLOURS[rng.integers(len(GROUND_COLOURS))]
    n = int(rng.integers(4, 8))
    objects = []
    for k in range(n):
        # object 0 straight ahead, the others spread around the start so turning reveals them
        angle = 0.0 if k == 0 else 2 * math.pi * (k + rng.uniform(-0.3, 0.3)) / n
        dist = rng.uniform(4.5, 6) if k == 0 else rng.uniform(3.5, 8)
        kind = "sphere" if rng.random() < 0.5 else "box"
        half = rng.uniform(0.6, 1.2) * (np.ones(3) if kind == "sphere" else rng.uniform(0.7, 1.3, 3))
        centre = np.array([dist * math.sin(angle), -half[1], dist * math.cos(angle)])  # resting on y = 0
        colour = names[rng.integers(len(names))]
        objects.append({"kind": kind, "colour": colour, "rgb": OBJECT_COLOURS[colour], "centre": centre, "half": half})
    return {"seed": scene_seed, "ground": ground, "cell": rng.uniform(1.0, 2.0),  # metres
            "phase": rng.uniform(0, 2 * math.pi, 2), "tint": rng.uniform(-1, 1, 3), "objects": objects}


def caption(scene_seed):
    """'a red sphere, a blue box and an orange sphere on a green and brown checkered ground'."""
    scene = make_scene(scene_seed)
    a = lambda word: ("an " if word[0] in "aeiou" else "a ") + word
    things = [a(f"{o['colour']} {o['kind']}") for o in scene["objects"]]
    first, _, second, _ = scene["ground"]
    return f"{', '.join(things[:-1])} and {things[-1]} on {a(first)} and {second} checkered ground"


@lru_cache(maxsize=4096)
def _word_vector(word, dim):
    g = torch.Generator().manual_seed(zlib.crc32(word.encode()))  # stable across runs, unlike hash()
    return torch.randn(dim, generator=g)


def text_embedding(caption, text_dim, text_len):
    """(text_len, text_dim): one token per word (hash-seeded vector + a position vector), zero padded."""
    out = torch.zeros(text_len, text_dim)
    for i, word in enumerate(re.findall(r"[a-z0-9]+", caption.lower())[:text_len]):
        out[i] = _word_vector(word, text_dim) + 0.5 * _word_vector(f"<position {i}>", text_dim)
    return out


def _cell_hash(i, j, seed):
    """Integer hash of ground cells (i, j) -> 4 uniform values in [-1, 1] (..., 4), same on every device."""
    h = (i * 374761393 + j * 668265263 + seed * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return torch.stack([(h >> s) & 0xFF for s in (0, 8, 16, 24)], -1).float() / 127.5 - 1


def _ground_colour(x, z, t, d_y, scene, pixel_angle):
    """Colour (..., 3) of the ground at points (x, z) hit at distance t by rays of vertical component d_y."""
    _, a, _, b = scene["ground"]
    a, b, cell = torch.tensor(a), torch.tensor(b), scene["cell"]
    i, j = torch.floor(x / cell).long(), torch.floor(z / cell).long()
    colour = a + (b - a) * ((i + j) % 2)[..., None]  # big cells of two moderately contrasted colours
    noise = _cell_hash(i, j, scene["seed"] % 100003)  # (..., 4)
    colour = colour * (1 + 0.1 * noise[..., :1]) + 0.04 * noise[..., 1:]  # per-cell brightness and hue
    wave = torch.sin(0.35 * x + scene["phase"][0]) * torch.cos(0.3 * z + scene["phase"][1])
    colour = colour + 0.07 * wave[..., None] * torch.tensor(scene["tint"], dtype=torch.float32)  # smooth hue
    # where one pixel covers a good part of a cell the checker would alias: fade to the mean colour
    footprint = t * pixel_angle / d_y.clamp_min(1e-3)
    fade = ((footprint / cell - 0.25) / 0.5).clamp(0, 1)[..., None]
    return colour + ((a + b) / 2 - colour) * fade


def _in_view(obj, w2c, K):
    """Whether a sphere around an object and its shadow (3x its size) can touch any frame's view."""
    p = w2c[:, :3, :3] @ torch.tensor(obj["centre"], dtype=torch.float32) + w2c[:, :3, 3]  # (F, 3) in camera
    r = 3 * float(obj["half"].max())
    fx, fy, cx, cy = K.unbind(-1)
    # signed distances to the four side planes of the pinhole frustum (x/z in [-cx/fx, (1-cx)/fx], same in y)
    sides = [(p[:, 0] * fx + p[:, 2] * cx) / (fx ** 2 + cx ** 2).sqrt(),
             (-p[:, 0] * fx + p[:, 2] * (1 - cx)) / (fx ** 2 + (1 - cx) ** 2).sqrt(),
             (p[:, 1] * fy + p[:, 2] * cy) / (fy ** 2 + cy ** 2).sqrt(),
             (-p[:, 1] * fy + p[:, 2] * (1 - cy)) / (fy ** 2 + (1 - cy) ** 2).sqrt()]
    return bool(((torch.stack(sides).amin(0) > -r) & (p[:, 2] > -r)).any())


def render_world(scene_seed, cameras, height, width, return_labels=False, supersample=2):
    """Ray cast a scene along `cameras` (relative to the start pose) -> video (3, F, H, W) in [-1, 1].

    Exact pinhole cameras from cameras.K (normalized) and cameras.w2c (first path of the batch).
    Each pixel averages supersample² rays. With return_labels also (F, H, W) long labels of what
    most of each pixel sees: SKY = 0, GROUND = 1, object k = 2 + k (object 0 stands straight ahead).
    """
    scene = make_scene(scene_seed)
    H, W = height * supersample, width * supersample
    w2c = (cameras.w2c[0].double() @ torch.tensor(start_w2c())).float()  # (F, 4, 4) in the world
    K = cameras.K[0].float()  # (F, 4)
    F = w2c.shape[0]
    # rays as separate x, y, z components: elementwise ops only, each (F, 1, 1) or (F, H, W)
    R = w2c[:, :3, :3, None, None]  # (F, 3, 3, 1, 1)
    centre = -(w2c[:, :3, :3].mT @ w2c[:, :3, 3:])[..., 0]  # (F, 3) camera centres
    o = [centre[:, i, None, None] for i in range(3)]
    fx, fy, cx, cy = (K[:, i, None, None] for i in range(4))
    x = ((torch.arange(W) + 0.5) / W - cx) / fx  # (F, 1, W) camera-space ray (x, y, 1)
    y = ((torch.arange(H)[:, None] + 0.5) / H - cy) / fy  # (F, H, 1)
    d = [R[:, 0, i] * x + R[:, 1, i] * y + R[:, 2, i] for i in range(3)]  # world direction Rᵀ(x, y, 1)
    norm = torch.rsqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    d = [di * norm for di in d]
    inv_d = [1 / di for di in d]
    sun = SUN.tolist()

    t_hit = torch.full((F, H, W), math.inf)
    label = torch.full((F, H, W), SKY)
    lit = torch.ones(F, H, W)  # ambient + diffuse sunlight on objects
    visible = [_in_view(obj, w2c, K) for obj in scene["objects"]]  # skip what no frame can see
    for k, obj in enumerate(scene["objects"]):
        if not visible[k]:
            continue
        rel = [oi - ci for oi, ci in zip(o, obj["centre"].tolist())]  # camera centre relative to the object
        half = obj["half"].tolist()
        if obj["kind"] == "sphere":
            b = rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]
            disc = b * b - (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - half[0] ** 2)
            t = -b - disc.clamp_min(0).sqrt()
            t = torch.where((disc > 0) & (t > 1e-4), t, math.inf)
            n_sun = sum((r + t.clamp_max(1e4) * di) * s for r, di, s in zip(rel, d, sun)) / half[0]
        else:  # axis-aligned box by slabs; the face entered last is the one hit
            t1 = [(-h - r) * inv for h, r, inv in zip(half, rel, inv_d)]
            t2 = [(h - r) * inv for h, r, inv in zip(half, rel, inv_d)]
            near = [torch.minimum(a, b) for a, b in zip(t1, t2)]
            far = [torch.maximum(a, b) for a, b in zip(t1, t2)]
            t_near = torch.maximum(torch.maximum(near[0], near[1]), near[2])
            t_far = torch.minimum(torch.minimum(far[0], far[1]), far[2])
            t = torch.where((t_far >= t_near) & (t_near > 1e-4), t_near, math.inf)
            face = [-torch.sign(di) * s for di, s in zip(d, sun)]  # n·sun for the face of each axis
            n_sun = torch.where(near[0] == t_near, face[0], torch.where(near[1] == t_near, face[1], face[2]))
        closer = t < t_hit
        t_hit = torch.where(closer, t, t_hit)
        label = torch.where(closer, 2 + k, label)
        lit = torch.where(closer, 0.45 + 0.55 * n_sun.clamp_min(0), lit)

    t_ground = torch.where(d[1] > 1e-6, -o[1] * inv_d[1], math.inf)  # the plane y = 0 (y points down)
    is_ground = t_ground < t_hit
    label = torch.where(is_ground, GROUND, label)
    t_hit = torch.where(is_ground, t_ground, t_hit)
    t_ground = t_ground.clamp_max(1e4)
    gx, gz = o[0] + t_ground * d[0], o[2] + t_ground * d[2]
    ground = _ground_colour(gx, gz, t_ground, d[1], scene, 1 / (K[0, 0].item() * width))
    shade = torch.ones(F, H, W)
    for obj in (obj for obj, v in zip(scene["objects"], visible) if v):  # soft blob shadows, away from the sun
        sx, sz = obj["centre"][[0, 2]] - SUN[[0, 2]] / -SUN[1] * obj["half"][1]
        r2 = ((gx - sx) ** 2 + (gz - sz) ** 2) / (4 * obj["half"][[0, 2]].max() ** 2)
        shade = shade * (1 - 0.35 * (1 - r2).clamp_min(0) ** 2)
    ground = ground * shade[..., None]

    horizon, zenith = torch.tensor([0.78, 0.85, 0.93]), torch.tensor([0.35, 0.55, 0.88])
    sky = horizon + (zenith - horizon) * ((-2.5 * d[1]).clamp(0, 1) ** 0.7)[..., None]  # deeper blue up high
    palette = torch.tensor([(0, 0, 0), (0, 0, 0)] + [obj["rgb"] for obj in scene["objects"]], dtype=torch.float32)
    colour = torch.nn.functional.embedding(label, palette) * lit[..., None]  # (F, H, W, 3)
    colour = torch.where((label == GROUND)[..., None], ground, colour)
    haze = (1 - torch.exp(-t_hit.clamp_max(1e4) / 60))[..., None]  # distant things fade into the horizon
    colour = torch.where((label == SKY)[..., None], sky, colour + (horizon - colour) * haze)

    video = torch.nn.functional.avg_pool2d(colour.permute(3, 0, 1, 2), supersample)  # (3, F, H, W)
    video = (video * 2 - 1).clamp(-1, 1)
    if not return_labels:
        return video
    votes = torch.nn.functional.one_hot(label, 2 + len(scene["objects"])).permute(0, 3, 1, 2).float()
    return video, torch.nn.functional.avg_pool2d(votes, supersample).argmax(1)  # (F, H, W)


def _world_centres(cameras):
    w2c = cameras.w2c[0].double() @ torch.tensor(start_w2c())  # (F, 4, 4)
    return -(w2c[:, :3, :3].mT @ w2c[:, :3, 3:])[..., 0], w2c  # (F, 3)


MOVES = list("wwwsadadjljljlunik") + ["wl", "wj", "dj", "al"]  # forward and turns most often; arcs, orbits


def _path_ok(cameras, scene_seed=None, margin=1.0):
    """Whether a path (relative to the start pose) stays where the procedural world looks right."""
    centres, w2c = _world_centres(cameras)
    height, look_up = -centres[:, 1], torch.rad2deg(torch.asin(-w2c[:, 2, 1]))  # metres, degrees
    if not (height.min() >= 0.3 and height.max() <= 5 and centres[:, [0, 2]].norm(dim=-1).max() <= 6
            and look_up.min() >= -65 and look_up.max() <= 15):
        return False
    for obj in make_scene(scene_seed)["objects"] if scene_seed is not None else []:
        c, half = torch.tensor(obj["centre"]), torch.tensor(obj["half"])
        if obj["kind"] == "sphere":
            gap = (centres - c).norm(dim=-1) - half[0]
        else:
            gap = ((centres - c).abs() - half).clamp_min(0).norm(dim=-1)
        if gap.min() < margin:
            return False
    return True


def sample_trajectory(generator, frames, trans_range=(0.1, 0.6), rot_range=(2.0, 10.0),
                      p_still=0.12, p_stop=0.12, scene_seed=None, width=1, height=1):
    """A random action string of frames - 1 steps and its Cameras (1, frames), in metres.

    Clip kinds: stand still (p_still), move then stop (p_stop), one action throughout, or 2-3
    segments of different actions. Step sizes are drawn per clip from trans_range (metres) and
    rot_range (degrees). A path that takes the camera below 0.3 m or above 5 m, more than 6 m from
    the start, to look more than 65° down or 15° up, or (given scene_seed) within 1 m of an object
    gets new step sizes from ranges shrunk by 20% per try; the kind stays, so its share is exact.
    """
    if frames < 2:
        raise ValueError(f"frames: need at least 2 frames for a trajectory, got {frames}")
    rand = lambda: torch.rand((), generator=generator).item()
    pick = lambda: MOVES[int(rand() * len(MOVES))]
    n, u = frames - 1, rand()
    if u < p_still:
        segments = [("x", n)]
    elif u < p_still + p_stop:
        m = 1 + int(rand() * max(n - 1, 1))
        segments = [(pick(), m), ("x", n - m)]
    elif u < 0.6:
        segments = [(pick(), n)]
    else:  # 2-3 segments
        cuts = sorted({int(rand() * n) for _ in range(1 + int(rand() * 2))} | {0, n})
        segments = [(pick(), b - a) for a, b in zip(cuts, cuts[1:])]
    merged = []  # "w*2,w*3" -> "w*5"
    for move, m in segments:
        if merged and merged[-1][0] == move:
            merged[-1][1] += m
        elif m > 0:
            merged.append([move, m])
    actions = ",".join(move if m == 1 else f"{move}*{m}" for move, m in merged)
    for attempt in range(30):
        trans = 0.8**attempt * (trans_range[0] + (trans_range[1] - trans_range[0]) * rand())
        rot = 0.8**attempt * (rot_range[0] + (rot_range[1] - rot_range[0]) * rand())
        cameras = actions_to_cameras(actions, trans, rot, width, height, START_PITCH)
        if _path_ok(cameras, scene_seed):
            return actions, cameras
    raise RuntimeError(f"no valid step size for {actions!r}")


def _mix(*ints):
    """A deterministic 62-bit integer from a tuple of non-negative integers."""
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> 2)


def make_clip(seed, index, frames, height, width, rank=0, world_size=1, text_dim=32, text_len=32):
    """Training clip `index` of `rank`: a dict of video (3, F, H, W), w2c (F, 4, 4), K (F, 4), text, ...

    Clip number g = index·world_size + rank, so ranks never share a clip; the scene seed and the
    trajectory come from hashes of (seed, g). Scene seeds stay below EVAL_SEED_BASE.
    """
    g = index * world_size + rank
    scene_seed = _mix(seed, g, 0) % EVAL_SEED_BASE
    generator = torch.Generator().manual_seed(_mix(seed, g, 1))
    actions, cameras = sample_trajectory(generator, frames, scene_seed=scene_seed, width=width, height=height)
    text = caption(scene_seed)
    return {"video": render_world(scene_seed, cameras, height, width), "w2c": cameras.w2c[0], "K": cameras.K[0],
            "text": text_embedding(text, text_dim, text_len), "caption": text, "scene_seed": scene_seed,
            "actions": actions}


def make_batch(seed, step, batch_size, frames, height, width, rank=0, world_size=1, text_dim=32, text_len=32):
    """Batch `step` of `rank`: clips step·batch_size ... + batch_size - 1, collated like a DataLoader.

    The same as ProceduralWorld(start=step·batch_size) batched, so a resumed run continues exactly.
    """
    clips = [make_clip(seed, step * batch_size + i, frames, height, width, rank, world_size, text_dim, text_len)
             for i in range(batch_size)]
    return torch.utils.data.default_collate(clips)


class ProceduralWorld(torch.utils.data.IterableDataset):
    """An endless stream of make_clip(seed, start), make_clip(seed, start + 1), ... for one rank.

    Resume from step s with start = s·batch_size. DataLoader workers take turns by whole batches
    (give the loader's batch_size here), so with any number of workers batch s is make_batch(s).
    """

    def __init__(self, frames, height, width, seed=0, rank=0, world_size=1, text_dim=32, text_len=32, start=0,
                 batch_size=1):
        super().__init__()
        self.frames, self.height, self.width, self.seed, self.start = frames, height, width, seed, start
        self.rank, self.world_size, self.text_dim, self.text_len = rank, world_size, text_dim, text_len
        self.batch_size = batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for step in range(worker, 2**62, workers):  # this worker's batches
            for i in range(self.batch_size):
                yield make_clip(self.seed, self.start + step * self.batch_size + i, self.frames, self.height,
                                self.width, self.rank, self.world_size, self.text_dim, self.text_len)


def eval_set(n, frames, height, width, seed=0):
    """n held-out clips [(scene_seed, actions, cameras, video)], fixed for a seed (scene seeds >= 10**9).

    Only moving paths that differ from their mirror image (`mirror_cameras`), so that both baselines
    of the control metric (a static copy of frame 0 and a different path) are informative.
    """
    out = []
    for i in range(n):
        scene_seed = EVAL_SEED_BASE + seed * 100_000 + i
        generator = torch.Generator().manual_seed(scene_seed)
        while True:
            actions, cameras = sample_trajectory(generator, frames, p_still=0, p_stop=0, scene_seed=scene_seed,
                                                 width=width, height=height)
            if (mirror_cameras(cameras).w2c - cameras.w2c).abs().max() > 0.1:
                break
        out.append((scene_seed, actions, cameras, render_world(scene_seed, cameras, height, width)))
    return out


# -----------------------------------------------------------------------------------------------
# codecs: video (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, F, h, w)

WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


class PixelCodec:
    """Parameter-free space-to-depth: each factor x factor patch becomes 3·factor² channels; exact."""

    def __init__(self, factor=2):
        self.factor, self.channels, self.spatial, self.temporal = factor, 3 * factor**2, factor, 1

    def encode(self, video):
        B, C, T, H, W = video.shape
        f = self.factor
        x = video.reshape(B, C, T, H // f, f, W // f, f).permute(0, 1, 4, 6, 2, 3, 5)
        return x.reshape(B, C * f * f, T, H // f, W // f)

    def decode(self, latents):
        B, C, T, h, w = latents.shape
        f = self.factor
        x = latents.reshape(B, C // (f * f), f, f, T, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        return x.reshape(B, C // (f * f), T, h * f, w * f)


class WanVAECodec:
    """Wan2.1's VAE (diffusers AutoencoderKLWan): z = (mu - mean) / std, 8x spatial, 4x temporal.

    Encoding uses the posterior mean; T = 4k + 1 frames give k + 1 latent frames. mean/std come from
    vae.config.latents_mean/latents_std when present with z_dim entries, else Wan's constants
    (z_dim = 16) or no normalization (tiny random VAEs of other sizes).
    """

    def __init__(self, vae):
        self.vae = vae.eval()
        cfg = vae.config
        self.channels = cfg.z_dim
        self.spatial = getattr(cfg, "scale_factor_spatial", None) or 8
        self.temporal = getattr(cfg, "scale_factor_temporal", None) or 4
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if not (mean and std and len(mean) == len(std) == cfg.z_dim):  # absent, or a tiny VAE's defaults
            mean, std = (WAN_MEAN, WAN_STD) if cfg.z_dim == 16 else ([0.0] * cfg.z_dim, [1.0] * cfg.z_dim)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @staticmethod
    def load(path):
        from diffusers import AutoencoderKLWan  # only when a real VAE is used
        sub = "vae" if (Path(path) / "vae").is_dir() else None  # a whole diffusers pipeline folder
        return WanVAECodec(AutoencoderKLWan.from_pretrained(path, subfolder=sub))

    @torch.no_grad()
    def encode(self, video):
        if (video.shape[2] - 1) % self.temporal:
            raise ValueError(f"video: Wan's VAE needs 4k+1 frames, got {video.shape[2]}")
        mu = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().float()
        return (mu - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents):
        z = latents.float() * self.std + self.mean
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


# -----------------------------------------------------------------------------------------------
# real data: videos + cameras + captions -> a cache of latents

def read_video(path, frames, height, width):
    """The first `frames` frames of a video, resized to cover (height, width) and centre-cropped.

    Returns video (3, T, H, W) in [-1, 1] and (h0, w0, rh, rw, top, left): the source frame size,
    the resized size and the crop offsets.
    """
    import imageio.v2 as imageio
    reader = imageio.get_reader(path, "ffmpeg")
    clip = []
    for frame in reader:
        clip.append(frame[..., :3])
        if len(clip) == frames:
            break
    reader.close()
    if len(clip) < frames:
        raise ValueError(f"{Path(path).name}: video has {len(clip)} frames, need {frames}")
    x = torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, h0, w0)
    h0, w0 = x.shape[-2:]
    s = max(height / h0, width / w0)
    rh, rw = max(height, round(h0 * s)), max(width, round(w0 * s))
    x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return x[..., top:top + height, left:left + width].transpose(0, 1).clamp(-1, 1), (h0, w0, rh, rw, top, left)


def load_text_encoder(path, text_len, text_dim):
    """caption -> (text_len, D): "hash" for `text_embedding`, else a (U)T5 encoder folder (+ tokenizer)."""
    if path == "hash":
        return lambda text: text_embedding(text, text_dim, text_len)
    import transformers
    p = Path(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(p / "tokenizer" if (p / "tokenizer").is_dir() else p)
    p = p / "text_encoder" if (p / "text_encoder").is_dir() else p
    umt5 = transformers.AutoConfig.from_pretrained(p).model_type == "umt5"  # Wan uses umT5-XXL
    model = (transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel).from_pretrained(p).eval()

    @torch.no_grad()
    def encode(text):
        ids = tokenizer(text, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt")
        h = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state[0]
        return h.float() * ids.attention_mask[0, :, None]  # zero the padding, as Wan does
    return encode


def _prepare_item(src, name, codec, encode_text, frames, height, width, text_len, scale):
    video, (h0, w0, rh, rw, top, left) = read_video(src / f"{name}.mp4", frames, height, width)
    cam_file = next((p for p in (src / f"{name}.json", src / f"{name}.txt") if p.is_file()), None)
    if cam_file is None:
        raise ValueError(f"{name}: cameras: no {name}.json or {name}.txt")
    cameras = load_cameras(cam_file, width=w0, height=h0, scale="metric")
    # one camera per latent frame: frames 0, temporal, 2·temporal, ... (or a file that already has that)
    latent_frames = (frames - 1) // codec.temporal + 1
    if cameras.num_frames >= frames:
        cameras = Cameras(cameras.w2c[:, :frames:codec.temporal], cameras.K[:, :frames:codec.temporal])
    elif cameras.num_frames != latent_frames:
        raise ValueError(f"{name}: cameras: {cameras.num_frames} frames, need {frames} (per video frame) "
                         f"or {latent_frames} (per latent frame)")
    cameras = normalize_scale(cameras, scale)
    # K_norm is relative to the source frame: the uniform resize keeps it, the crop re-centres it
    fx, fy, cx, cy = cameras.K[0].unbind(-1)
    K = torch.stack([fx * rw / width, fy * rh / height, (cx * rw - left) / width, (cy * rh - top) / height], -1)
    pre = src / f"{name}.text.safetensors"
    if pre.is_file():
        from safetensors.torch import load_file
        stored = load_file(pre)
        text = stored["text"] if "text" in stored else next(iter(stored.values()))
        text = torch.nn.functional.pad(text.float(), (0, 0, 0, max(0, text_len - len(text))))[:text_len]
    elif (src / f"{name}.caption.txt").is_file() and encode_text is not None:
        text = encode_text((src / f"{name}.caption.txt").read_text().strip())
    else:
        raise ValueError(f"{name}: text: need {name}.text.safetensors, or {name}.caption.txt and --text_encoder")
    latents = codec.encode(video[None])[0]  # (C, F, h, w)
    return {"latents": latents.contiguous(), "w2c": cameras.w2c[0].contiguous(), "K": K.contiguous(),
            "text": text.contiguous()}


def prepare(src, out, vae=None, text_encoder=None, frames=81, height=480, width=832, text_len=512,
            text_dim=32, shard_size=16, scale="per_clip"):
    """Cache every NAME.mp4 in `src` as latents + cameras + text in safetensors shards and index.json.

    Resumable: shards are written atomically before index.json records their items, and items
    already in the index are skipped. Items that fail (missing cameras, too short) are reported and
    skipped. Returns the names cached by this call.
    """
    from safetensors.torch import save_file
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codec = WanVAECodec.load(vae) if vae else PixelCodec(2)
    settings = {"codec": str(vae) if vae else "pixel2", "text_encoder": str(text_encoder), "frames": frames,
                "height": height, "width": width, "text_len": text_len, "scale": scale}
    index_path = out / "index.json"
    index = {"settings": settings, "shards": [], "items": []}
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    if index["settings"] != settings:
        raise ValueError(f"{index_path}: settings: prepared with {index['settings']}, now asked for {settings}")
    done = {item["name"] for item in index["items"]}
    todo = [p.stem for p in sorted(src.glob("*.mp4")) if p.stem not in done]
    encode_text = load_text_encoder(text_encoder, text_len, text_dim) if text_encoder else None
    pending, new = [], []

    def flush():
        shard = f"shard_{len(index['shards']):05d}.safetensors"
        tensors = {f"{j}.{key}": value for j, (_, item) in enumerate(pending) for key, value in item.items()}
        _write_atomic(out / shard, lambda tmp: save_file(tensors, tmp))
        index["shards"].append(shard)
        index["items"] += [{"name": name, "shard": shard, "slot": j} for j, (name, _) in enumerate(pending)]
        _write_atomic(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
        new.extend(name for name, _ in pending)
        pending.clear()

    for name in todo:
        try:
            pending.append((name, _prepare_item(src, name, codec, encode_text, frames, height, width, text_len, scale)))
        except ValueError as e:
            print(f"skip {e}")
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    return new


class LatentDataset(torch.utils.data.Dataset):
    """A prepared cache: items {"latents": (C, F, h, w), "w2c": (F, 4, 4), "K": (F, 4), "text": (L, D)}."""

    def __init__(self, root):
        self.root = Path(root)
        self.items = json.loads((self.root / "index.json").read_text())["items"]
        self.shard_name, self.shard = None, None  # the last shard read, kept for the next item

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from safetensors.torch import load_file
        item = self.items[i]
        if item["shard"] != self.shard_name:
            self.shard_name, self.shard = item["shard"], load_file(self.root / item["shard"])
        return {key: self.shard[f"{item['slot']}.{key}"] for key in ("latents", "w2c", "K", "text")}


# -----------------------------------------------------------------------------------------------
# a picture of a trajectory

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


# -----------------------------------------------------------------------------------------------

def bench(frames=8, size=32, clips=40):
    """Print rendered frames/s of the procedural world, and of whole training clips."""
    cameras = actions_to_cameras(f"wl*{frames - 1}", 0.3, 5.0, pitch0=START_PITCH)  # an arc
    render_world(0, cameras, size, size)  # warm up
    t0 = time.perf_counter()
    for i in range(clips):
        render_world(i, cameras, size, size)
    dt = time.perf_counter() - t0
    print(f"render {size}x{size}, {cameras.num_frames} frames: {clips * cameras.num_frames / dt:.0f} frames/s "
          f"({1e3 * dt / clips:.1f} ms/clip)")
    t0 = time.perf_counter()
    for i in range(clips):
        make_clip(0, i, frames, size, size)
    dt = time.perf_counter() - t0
    print(f"make_clip {size}x{size}, {frames} frames: {clips * frames / dt:.0f} frames/s "
          f"({1e3 * dt / clips:.1f} ms/clip)")


# ----------------------------------------------------------------------------------------------
# The control metric (DESIGN §4): does the model go where the cameras say?
#
# On held-out scenes x paths, every stage is measured the same way (it passes its own sampler):
#   psnr            generated frames 1.. vs the true rendering along the same path
#   gain_static     psnr - psnr of a static copy of frame 0
#   control_margin  psnr - psnr of the same model fed the mirrored path (scored against the true path)
#   oracle_margin   psnr - psnr of the TRUE rendering along the mirrored path: the most a perfect
#                   follower could get; margin_ratio = control_margin / oracle_margin
#   loss_gap@s      flow-matching loss with mirrored vs true cameras at fixed sigma s and fixed noise,
#                   relative ((L_mirror - L_true) / L_true): fast and sensitive, usable while training
#   sharpness       image-gradient energy of generated frames / the truth's (1.0 = as sharp): PSNR
#                   rewards blur, so every PSNR is read beside it


def psnr(a, b):
    """Per-clip PSNR over all given frames; a, b (B, 3, F, H, W) in [-1, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(a, b):
    """Per-clip mean SSIM (8x8 box windows, per frame and channel), data range [-1, 1] mapped to [0, 1]."""
    B, C, F_, H, W = a.shape
    a, b = ((a + 1) / 2).transpose(1, 2).reshape(-1, C, H, W), ((b + 1) / 2).transpose(1, 2).reshape(-1, C, H, W)
    k = min(8, H, W)
    mu = lambda x: torch.nn.functional.avg_pool2d(x, k, 1)
    ma, mb = mu(a), mu(b)
    va, vb, cov = mu(a * a) - ma ** 2, mu(b * b) - mb ** 2, mu(a * b) - ma * mb
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return s.reshape(B, -1).mean(1)


def sharpness(x):
    """Mean squared image gradient (x and y) per clip; x (B, 3, F, H, W)."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    gy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    return gx + gy


def eval_clips(n, frames, height, width, text_dim, text_len, seed=0):
    """n fixed held-out clips with their mirrored paths and the true renderings along both."""
    out = {"video": [], "other": [], "w2c": [], "w2c_other": [], "K": [], "text": []}
    for scene_seed, actions, cams, video in eval_set(n, frames, height, width, seed=seed):
        other = mirror_cameras(cams)
        out["video"].append(video)
        out["other"].append(render_world(scene_seed, other, height, width))
        out["w2c"].append(cams.w2c[0])
        out["w2c_other"].append(other.w2c[0])
        out["K"].append(cams.K[0])
        out["text"].append(text_embedding(caption(scene_seed), text_dim, text_len))
    return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def control_metric(sample, velocity, codec, clips, loss_sigmas=(0.5, 0.9), batch=16, seed=0, device="cpu",
                   return_videos=False):
    """Measure camera control; see the section comment for every number returned.

    sample(noise, text, cameras, first) -> latents (B, C, F, h, w), with first = clean latent frame 0
    velocity(x_t, sigma, text, cameras, first, x0) -> v  (x0 lets AR models use teacher forcing)
    clips: from eval_clips(). Noise is fixed by `seed`, so numbers are comparable across stages.
    return_videos: also return the first batch's videos {generated, truth, mirrored} (B, 3, F, H, W).
    """
    videos = None
    n = clips["video"].shape[0]
    rows = {k: [] for k in ("psnr", "psnr_static", "psnr_other", "psnr_oracle", "ssim", "ssim_other",
                            "sharp", "sharp_true", *[f"loss@{s}" for s in loss_sigmas],
                            *[f"loss_other@{s}" for s in loss_sigmas])}
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, n, batch):
        sl = slice(i, min(i + batch, n))
        video, other = clips["video"][sl].to(device), clips["other"][sl].to(device)
        text = clips["text"][sl].to(device)
        cams = Cameras(clips["w2c"][sl], clips["K"][sl]).to(device)
        cams_o = Cameras(clips["w2c_other"][sl], clips["K"][sl]).to(device)
        x0 = codec.encode(video)  # (B, C, F, h, w)
        first = x0[:, :, 0]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        gen_true = codec.decode(sample(noise, text, cams, first)).clamp(-1, 1)
        gen_other = codec.decode(sample(noise, text, cams_o, first)).clamp(-1, 1)
        tail = lambda v: v[:, :, 1:]  # frame 0 is given: score frames 1..
        static = video[:, :, :1].expand_as(video)
        if videos is None:
            videos = dict(generated=gen_true.cpu(), truth=video.cpu(), mirrored=gen_other.cpu())
        rows["psnr"].append(psnr(tail(gen_true), tail(video)))
        rows["psnr_static"].append(psnr(tail(static), tail(video)))
        rows["psnr_other"].append(psnr(tail(gen_other), tail(video)))
        rows["psnr_oracle"].append(psnr(tail(other), tail(video)))
        rows["ssim"].append(ssim(tail(gen_true), tail(video)))
        rows["ssim_other"].append(ssim(tail(gen_other), tail(video)))
        rows["sharp"].append(sharpness(tail(gen_true)))
        rows["sharp_true"].append(sharpness(tail(video)))
        for s in loss_sigmas:
            x_t = (1 - s) * x0 + s * noise
            for key, c in ((f"loss@{s}", cams), (f"loss_other@{s}", cams_o)):
                v = velocity(x_t, s, text, c, first, x0)
                rows[key].append((v - (noise - x0)).pow(2).flatten(1).mean(1))
    r = {k: torch.cat(v).cpu() for k, v in rows.items()}
    out = dict(
        clips=n, psnr=r["psnr"].mean().item(), ssim=r["ssim"].mean().item(),
        gain_static=(r["psnr"] - r["psnr_static"]).mean().item(),
        control_margin=(r["psnr"] - r["psnr_other"]).mean().item(),
        margin_wins=(r["psnr"] > r["psnr_other"]).float().mean().item(),
        oracle_margin=(r["psnr"] - r["psnr_oracle"]).mean().item(),
        ssim_margin=(r["ssim"] - r["ssim_other"]).mean().item(),
        sharpness=(r["sharp"].mean() / r["sharp_true"].mean()).item(),
    )
    out["margin_ratio"] = out["control_margin"] / out["oracle_margin"] if out["oracle_margin"] > 0 else float("nan")
    for s in loss_sigmas:
        lt, lo = r[f"loss@{s}"].mean().item(), r[f"loss_other@{s}"].mean().item()
        out[f"loss_gap@{s}"] = (lo - lt) / lt
    return (out, videos) if return_videos else out


def evaluate(sample, velocity, codec, clips, gif_path=None, device="cpu"):
    """control_metric + a gif of the first clips (generated | truth, one clip per row); returns the metrics."""
    m, videos = control_metric(sample, velocity, codec, clips, device=device, return_videos=True)
    if gif_path:
        rows = [torch.cat([g, t], -1) for g, t in zip(videos["generated"][:4], videos["truth"][:4])]
        save_video(gif_path, torch.cat(rows, -2))
    return m


def format_metric(m):
    """One line for logs and README tables."""
    gaps = " ".join(f"gap@{k[9:]}={v:+.1%}" for k, v in m.items() if k.startswith("loss_gap@"))
    return (f"psnr {m['psnr']:.2f} dB | margin {m['control_margin']:+.2f} dB ({m['margin_wins']:.0%} clips, "
            f"{m['margin_ratio']:.0%} of oracle {m['oracle_margin']:+.2f}) | gain/static {m['gain_static']:+.2f} dB | "
            f"{gaps} | sharpness {m['sharpness']:.2f}")


# ----------------------------------------------------------------------------------------------
# what the training stages read


def perturb_cameras(w2c, std, generator):
    """Ablation (--camera_noise): jitter poses of frames 1.. like perception-estimated cameras.

    w2c (F, 4, 4); rotations by ~std radians about a random axis, translations by ~std metres.
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
    return J @ w2c


def training_source(cfg, model_cfg):
    """(codec, source) for a training stage; source(step, rank, world) -> this rank's share of batch `step`.

    Every sample - its clip, noise, uniforms for sigma, caption dropout, camera jitter - comes from
    (cfg.seed, global sample index) alone, so a run gives the same steps on 1 or N processes and
    `--resume` continues exactly. Returns dict x0 (B, C, F, h, w), noise like x0, u (B, F) uniforms
    for the stage's sigma sampling, text (B, L, D) (zeros where dropped), cameras (Cameras).
    cfg needs: seed, batch_size, frames, height, width, text_len, text_drop, camera_noise, data.
    """
    if cfg.data:
        dataset = LatentDataset(cfg.data)
        codec = None  # latents come prepared; nothing to decode while training
    else:
        codec = PixelCodec(2)

    def one(g):
        gen = torch.Generator().manual_seed(_mix(cfg.seed, g, 7))
        if cfg.data:
            item = dataset[int(torch.randint(len(dataset), (1,), generator=gen))]
            x0, w2c, K, text = item["latents"].float(), item["w2c"], item["K"], item["text"]
        else:
            clip = make_clip(cfg.seed, g, cfg.frames, cfg.height, cfg.width, 0, 1, model_cfg.text_dim, cfg.text_len)
            x0 = codec.encode(clip["video"][None])[0]
            w2c, K, text = clip["w2c"], clip["K"], clip["text"]
        if cfg.camera_noise > 0:
            w2c = perturb_cameras(w2c, cfg.camera_noise, gen)
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(x0.shape[1], generator=gen)
        if torch.rand((), generator=gen) < cfg.text_drop:
            text = torch.zeros_like(text)
        return dict(x0=x0, noise=noise, u=u, text=text, w2c=w2c, K=K)

    def source(step, rank, world, device="cpu"):
        B = cfg.batch_size // world
        items = [one(step * cfg.batch_size + rank * B + i) for i in range(B)]
        b = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
        b["cameras"] = Cameras(b.pop("w2c"), b.pop("K"))
        return b

    return codec, source


def save_video(path, video, fps=8, scale=4):
    """video (3, F, H, W) in [-1, 1] -> an mp4 or gif (by the suffix), upscaled for a person to watch."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0)  # (F, H, W, 3)
    frames = frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    import imageio.v2 as imageio
    if path.endswith(".gif"):
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
    else:
        imageio.mimsave(path, list(frames), fps=fps, macro_block_size=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="minWM data: bench the procedural world, prepare real videos")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--frames", type=int, default=8)
    b.add_argument("--size", type=int, default=32)
    p = sub.add_parser("prepare")
    p.add_argument("--src", required=True,
                   help="folder of NAME.mp4 + NAME.json|NAME.txt + NAME.caption.txt|NAME.text.safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--vae", default=None, help="AutoencoderKLWan folder (default: the pixel codec)")
    p.add_argument("--text_encoder", default=None, help='(U)T5 encoder folder with its tokenizer, or "hash"')
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text_len", type=int, default=512)
    p.add_argument("--text_dim", type=int, default=32, help='for --text_encoder hash')
    p.add_argument("--shard_size", type=int, default=16)
    p.add_argument("--scale", default="per_clip", choices=["per_clip", "metric"])
    args = parser.parse_args()
    if args.command == "bench":
        bench(args.frames, args.size)
    else:
        names = prepare(args.src, args.out, args.vae, args.text_encoder, args.frames, args.height, args.width,
                        args.text_len, args.text_dim, args.shard_size, args.scale)
        print(f"cached {len(names)} new items in {args.out}")
