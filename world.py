"""The procedural world: the embedded data set, with exact cameras and exact ground truth for any path.

The embedded default dataset: a textured ground plane (y = 0, world axes = OpenCV axes, so heights
are -y), a sky and 4-7 coloured spheres and boxes, ray cast in torch for any camera. Every scene has a
start pose 1.5 m above the ground pitched 20° down, so ground fills ~60-80% of the view (72% on
average; a sky-heavy view makes "repeat frame 0" a strong baseline and hides control). Cameras passed to `render_world` are
relative to it: world w2c = w2c_rel · w2c_start. The ground texture is big (1-2 m) cells of two
moderately contrasted colours with per-cell and smooth low-frequency colour variation, faded to its
mean colour where a pixel covers a cell (fine high-contrast texture pins every PSNR at a floor).
Object 0 always stands straight ahead; the others are spread around the start so that turning
reveals them. Scene seeds >= EVAL_SEED_BASE (10**9) are held out: training never produces them.
A training clip (`make_clip`, which `data.training_source` calls) pairs a scene with a random path of
the action vocabulary (`sample_trajectory`, 0.1-0.6 m and 2-10° per latent frame, fixed metric scale)
and a caption embedded by `text_embedding` (a toy text encoder: one hashed vector per word);
`heldout_path` gives the fixed held-out paths of the control metric (`metric.py`), `long_heldout_path`
those of the long-rollout metric, and `redraw_unseen` the same scene with the objects frame 0 does not show
moved elsewhere, or left out (that metric's perfect-model baselines).
"""
import math
import re
import zlib
from functools import lru_cache

import numpy as np
import torch

from cameras import rotation, actions_to_cameras, mirror_cameras, rigid_inverse
from prope import Cameras
from common import mix_seed

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
    c2w[:3, :3] = rotation(0, -math.radians(START_PITCH))
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


def render_world(scene_seed, cameras, height, width, return_labels=False, supersample=2, scene=None):
    """Ray cast a scene along `cameras` (relative to the start pose) -> video (3, F, H, W) in [-1, 1].

    Exact pinhole cameras from cameras.K (normalized) and cameras.w2c (first path of the batch).
    Each pixel averages supersample² rays. With return_labels also (F, H, W) long labels of what
    most of each pixel sees: SKY = 0, GROUND = 1, object k = 2 + k (object 0 stands straight ahead).
    scene: a make_scene dict to render instead of scene_seed's own (redraw_unseen's); an object with
    "body": False casts its shadow but is not drawn (all that invents nothing knows of an object frame 0 shows
    only the shadow of).
    """
    scene = scene or make_scene(scene_seed)
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
        if not visible[k] or not obj.get("body", True):
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
        if _gap(obj, centres).min() < margin:
            return False
    return True


def _gap(obj, centres):
    """(F,) metres between each camera centre (F, 3) and an object's surface."""
    c, half = torch.tensor(obj["centre"]), torch.tensor(obj["half"])
    if obj["kind"] == "sphere":
        return (centres - c).norm(dim=-1) - half[0]
    return ((centres - c).abs() - half).clamp_min(0).norm(dim=-1)


def objects_shown(scene_seed, first, height, width, shadows=True, supersample=2):
    """The indices of the objects frame 0 (Cameras (1, 1)) shows. shadows=True: each alone changes its rendering
    (a sliver at the edge or a shadow is enough: reveal_path's unseen objects leave no trace at all).
    shadows=False: some of its body is the first thing one of frame 0's rays hits (render_world's supersample²
    rays a pixel): a shadow alone says neither what casts it nor its colour, and a body hidden behind another
    object is not shown either (the long metric's invent-nothing world, redraw_unseen(invent=False))."""
    if not shadows:  # supersample² rays a pixel are the pixels of a supersample× larger frame, one ray each
        labels = render_world(scene_seed, first, height * supersample, width * supersample, True, supersample=1)[1]
        return sorted(k - 2 for k in labels.unique().tolist() if k >= 2)  # labels 2 + k: object k
    scene = make_scene(scene_seed)
    frame0 = lambda objects: render_world(scene_seed, first, height, width, scene={**scene, "objects": objects})
    bare = frame0([])
    return [k for k, o in enumerate(scene["objects"]) if not torch.equal(frame0([o]), bare)]


def redraw_unseen(scene_seed, cameras, height, width, draw=0, margin=1.0, tries=200, invent=True):
    """The scene as a perfect world model could imagine it from frame 0 and the caption alone: a scene dict
    for render_world(scene=...), the long-rollout metric's re-drawn-world row. invent=False leaves every
    object frame 0 does not show out instead (that metric's row of a perfect model that invents nothing); there an
    object frame 0 shows only the shadow of keeps its shadow (frame 0's pixels) but loses its body ("body": False):
    from a shadow alone nothing says what stands there.

    What frame 0 shows stays (the ground, the sky, every object that changes frame 0); every other object
    keeps its kind and colour (the caption names them, in order) and its size (which the caption does not
    give: this flatters the baseline) and is put at a new place drawn as make_scene draws object k's, among
    the places that leave frame 0 unchanged and that the path passes no closer than `margin` metres to (the
    long paths keep that distance from every object). An object with no such place in `tries` keeps its own.
    """
    scene = make_scene(scene_seed)
    first = Cameras(cameras.w2c[:1, :1], cameras.K[:1, :1])
    frame0 = lambda objects: render_world(scene_seed, first, height, width, scene={**scene, "objects": objects})
    bare = frame0([])
    n, rng, centres = len(scene["objects"]), np.random.default_rng([scene_seed, draw]), _world_centres(cameras)[0]
    shown = objects_shown(scene_seed, first, height, width)  # a body or only a shadow
    body = shown if invent else objects_shown(scene_seed, first, height, width, shadows=False)
    objects = []
    for k, obj in enumerate(scene["objects"]):
        if k in shown:
            objects.append(obj if k in body else {**obj, "body": False})
            continue
        if not invent:  # left out: the world shows only what frame 0 showed
            continue
        for _ in range(tries):
            angle = 0.0 if k == 0 else 2 * math.pi * (k + rng.uniform(-0.3, 0.3)) / n  # make_scene's prior
            dist = rng.uniform(4.5, 6) if k == 0 else rng.uniform(3.5, 8)
            new = {**obj, "centre": np.array([dist * math.sin(angle), obj["centre"][1], dist * math.cos(angle)])}
            if _gap(new, centres).min() >= margin and torch.equal(frame0([new]), bare):
                objects.append(new)
                break
        else:
            objects.append(obj)
    return {**scene, "objects": objects}


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


REVEAL_MAX_ROT = 12.0  # degrees per latent frame: a little above sample_trajectory's 10, to reach objects further round


def reveal_path(generator, frames, scene_seed, width=1, height=1, min_share=0.04, tries=12):
    """A path (actions, Cameras (1, frames)) that turns towards an object frame 0 does not show, so that it covers
    at least `min_share` of the last frame: the clips (`--reveal`) in which only the caption says what enters the
    view. A turn or an arc (forward and turn) of one step size throughout; None if no such path is found in
    `tries` draws (every object in view already, or none within reach of `frames` - 1 turns).
    """
    rand = lambda: torch.rand((), generator=generator).item()
    objects = make_scene(scene_seed)["objects"]
    start = actions_to_cameras("x", width=width, height=height, pitch0=START_PITCH)  # frame 0 only ("x": stand)
    shown = objects_shown(scene_seed, Cameras(start.w2c[:, :1], start.K[:, :1]), height, width)
    unseen = [k for k in range(len(objects)) if k not in shown]
    for _ in range(tries if unseen else 0):
        k = unseen[int(rand() * len(unseen))]
        x, _, z = objects[k]["centre"]
        angle = math.degrees(math.atan2(x, z))  # the yaw that faces the object from the start (+: to the right)
        turn = "l" if angle > 0 else "j"
        move = ("w" + turn) if rand() < 0.5 else turn
        rot = (abs(angle) - 25 + 35 * rand()) / (frames - 1)  # end facing it give or take half the field of view
        trans = 0.1 + 0.3 * rand()
        if not 2.0 <= rot <= REVEAL_MAX_ROT:
            continue
        actions = f"{move}*{frames - 1}"
        cameras = actions_to_cameras(actions, trans, rot, width, height, START_PITCH)
        if not _path_ok(cameras, scene_seed):
            continue
        last = Cameras(cameras.w2c[:, -1:], cameras.K[:, -1:])
        labels = render_world(scene_seed, last, height, width, True, supersample=1)[1]  # cheap: one frame, one ray a pixel
        if (labels == 2 + k).float().mean() >= min_share:
            return actions, cameras
    return None


def make_clip(seed, index, frames, height, width, text_dim, text_len, wander=False, reveal=0.0, shown=False):
    """Training clip number `index`: a dict of video (3, F, H, W), w2c (F, 4, 4), K (F, 4), text, ...

    The scene seed and the path come from hashes of (seed, index) alone, so a clip is the same
    whichever process draws it. Scene seeds stay below EVAL_SEED_BASE. wander: a long path
    (long_actions, 0.1-0.4 m and 3-8° per step for this clip) instead of sample_trajectory's clip kinds,
    for clips far longer than the 8 frames those are made for. reveal: the share of clips that are
    `reveal_path`s instead (of either kind; drawn from their own seed, so that reveal=0 gives the clips of
    a run without it; a scene with no unseen object within reach keeps its ordinary clip). shown: also
    "shown" (3, F, H, W), the same path with every object frame 0 does not show left out (redraw_unseen's
    invent=False): where it equals the video, frame 0 and the cameras determine the pixel.
    """
    scene_seed = mix_seed(seed, index, 0) % EVAL_SEED_BASE
    generator = torch.Generator().manual_seed(mix_seed(seed, index, 1))
    path = None
    if reveal > 0:
        reveal_generator = torch.Generator().manual_seed(mix_seed(seed, index, 3))
        if torch.rand((), generator=reveal_generator) < reveal:
            path = reveal_path(reveal_generator, frames, scene_seed, width, height)
    if path:
        actions, cameras = path
    elif wander:
        u = torch.rand(2, generator=generator).tolist()
        trans, rot = 0.1 + 0.3 * u[0], 3 + 5 * u[1]
        actions = long_actions(scene_seed, frames - 1, trans, rot, seed=mix_seed(seed, index, 2))
        cameras = actions_to_cameras(actions, trans, rot, width, height, START_PITCH)
    else:
        actions, cameras = sample_trajectory(generator, frames, scene_seed=scene_seed, width=width, height=height)
    text = caption(scene_seed)
    out = {"video": render_world(scene_seed, cameras, height, width), "w2c": cameras.w2c[0], "K": cameras.K[0],
           "text": text_embedding(text, text_dim, text_len), "caption": text, "scene_seed": scene_seed,
           "actions": actions}
    if shown:
        out["shown"] = render_world(scene_seed, cameras, height, width,
                                    scene=redraw_unseen(scene_seed, cameras, height, width, invent=False))
    return out


def heldout_path(index, frames, seed=0, width=1, height=1):
    """Held-out path `index`: (scene_seed, actions, cameras (1, frames)), fixed for a seed (scene seeds >= 10**9).

    Only moving paths that differ from their mirror image (`mirror_cameras`), so that both baselines
    of the control metric (a static copy of frame 0 and a different path) are informative.
    """
    scene_seed = EVAL_SEED_BASE + seed * 100_000 + index
    generator = torch.Generator().manual_seed(scene_seed)
    while True:
        actions, cameras = sample_trajectory(generator, frames, p_still=0, p_stop=0, scene_seed=scene_seed,
                                             width=width, height=height)
        if (mirror_cameras(cameras).w2c - cameras.w2c).abs().max() > 0.1:
            return scene_seed, actions, cameras


LONG_SEED_OFFSET = 500_000  # long held-out paths use scenes EVAL_SEED_BASE + 500_000 + ...: apart from heldout_path's
REVEAL_SEED_OFFSET = 800_000  # held-out reveal paths: scenes EVAL_SEED_BASE + 800_000 + ...


def long_actions(scene_seed, steps, trans_step=0.25, rot_step=5.0, radius=5.0, seed=0):
    """A wandering action string of `steps` steps for long rollouts: segments of 3-9 steps of forward
    moves, arcs, turns and strafes. A step that would take the camera (or a point 1.5 m further the
    same way) more than `radius` metres from the start or within 1 m of an object's footprint becomes
    a turn towards the start, so a path of any length stays where the scene has things to see.
    Height and pitch stay at the start pose's.
    """
    rng = np.random.default_rng([scene_seed, seed])
    objects = make_scene(scene_seed)["objects"]

    def clear(p):  # p (2,) = (x, z) on the ground
        for o in objects:
            d = p - o["centre"][[0, 2]]
            gap = (np.linalg.norm(d) - o["half"][0] if o["kind"] == "sphere"
                   else np.linalg.norm(np.maximum(np.abs(d) - o["half"][[0, 2]], 0)))
            if gap < 1.0:
                return False
        return np.linalg.norm(p) <= radius

    pos, yaw, out, segment, left = np.zeros(2), 0.0, [], "w", 0  # yaw: +z turns towards +x
    while len(out) < steps:
        if left == 0:
            segment, left = str(rng.choice(["w", "w", "w", "wl", "wj", "l", "j", "d", "a"])), int(rng.integers(3, 10))
        heading = np.array([math.sin(yaw), math.cos(yaw)])
        way = {"w": heading, "d": np.array([heading[1], -heading[0]]), "a": np.array([-heading[1], heading[0]])}
        shift = sum((way[ch] for ch in segment if ch in way), np.zeros(2))
        move = segment
        if shift.any() and not (clear(pos + trans_step * shift) and clear(pos + (trans_step + 1.5) * shift)):
            move, left = ("l" if heading[1] * -pos[0] - heading[0] * -pos[1] > 0 else "j"), 1  # towards the start
        for ch in move:
            if ch in way:
                pos = pos + trans_step * way[ch]
            elif ch in "lj":
                yaw += (1 if ch == "l" else -1) * math.radians(rot_step)
        out.append(move)
        left -= 1
    return ",".join(out)


def long_heldout_path(index, frames, seed=0, width=1, height=1):
    """Long held-out path `index`: (scene_seed, actions, cameras (1, frames)) from the start pose, wandering
    (long_actions) with 0.25 m and 5° steps; fixed for a seed, scene seeds >= EVAL_SEED_BASE."""
    scene_seed = EVAL_SEED_BASE + LONG_SEED_OFFSET + seed * 100_000 + index
    actions = long_actions(scene_seed, frames - 1, seed=seed)
    return scene_seed, actions, actions_to_cameras(actions, 0.25, 5.0, width, height, START_PITCH)


def reveal_heldout_paths(n, frames, seed=0, width=1, height=1):
    """The first n held-out reveal paths: [(scene_seed, actions, cameras (1, frames))], a `reveal_path` from the
    start pose of each held-out scene (from EVAL_SEED_BASE + REVEAL_SEED_OFFSET on) that has one; fixed for a seed."""
    out, scene_seed = [], EVAL_SEED_BASE + REVEAL_SEED_OFFSET + seed * 100_000
    while len(out) < n:
        path = reveal_path(torch.Generator().manual_seed(scene_seed), frames, scene_seed, width, height)
        if path is not None:
            out.append((scene_seed, *path))
        scene_seed += 1
    return out
