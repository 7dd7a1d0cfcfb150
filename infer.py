"""Stream a camera-controlled video from an AR checkpoint, chunk by chunk, through the KV cache.

    python infer.py --cameras assets/orbit.json               # any format cameras.load_cameras reads
    python infer.py --actions "w*8,j*4" --scene_seed 1000000003
    python infer.py --interactive                             # one action line on stdin -> one chunk
    python infer.py --ckpt wan_minwm.safetensors --vae Wan2.1-VAE/ --image first.png --prompt "..." \
                    --text_encoder umt5/ --cameras traj.json --height 480 --width 832

Writes OUT.mp4, OUT.gif, OUT_path.png (top-down camera path) and OUT.json (settings, first-chunk
latency, per-chunk latency, FPS). The cache keeps `sink` frames and a `window` of recent frames, so
an arbitrarily long camera file streams in bounded memory; frames are written as they come.

The rollout itself is a `Stream` (model, codec, first frame, text, KV cache, noise generator, next
frame index) made by `open_stream` and advanced by `Stream.step(cameras) -> frames`; `play.py`
steps the same object from a browser's keys, so a played game equals `--actions` of its steps.
"""
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

import cameras
import common
import data
import model as M
import world
from prope import Cameras


@dataclass
class StreamConfig:
    """What a rollout needs, whoever drives it (infer.py's camera file / actions / stdin, play.py's keys)."""
    ckpt: str = ""  # "" = the shipped model: the latest of assets/{dmd,cd,ode,ar}
    image: str = ""  # first frame (PNG/JPG); "" = a procedural scene
    scene_seed: int = 1_000_000_003  # procedural scene (seeds >= 10**9 are held out from training)
    prompt: str = ""  # text; "" = the procedural scene's caption
    text_encoder: str = ""  # (U)T5 folder for --prompt on real checkpoints ("" = the toy hash embedding)
    text_emb: str = ""  # precomputed text embedding (.safetensors, first tensor, (L, D))
    vae: str = ""  # Wan VAE folder (AutoencoderKLWan) for checkpoints with 16-channel latents
    sampler: str = "few"  # few: x0 + re-noise over --timesteps | euler: --steps Euler steps
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    steps: int = 25
    shift: float = 1.0
    sink: int = M.STREAM_SINK  # latent frames always kept in the cache
    window: int = M.STREAM_WINDOW  # latent frames of recent context kept in the cache
    height: int = 32  # output pixels
    width: int = 32
    text_len: int = 16
    trans_step: float = 0.25  # metres per action step
    rot_step: float = 5.0  # degrees per action step
    fps: int = 8
    seed: int = 0
    device: str = ""


@dataclass
class Config(StreamConfig):
    cameras: str = ""  # a camera file: JSON v1, HY-WorldPlay pose JSON or RealEstate10K txt
    actions: str = ""  # or an action string: w/s a/d u/n j/l i/k x, e.g. "w*8,j*4"
    interactive: bool = False  # or read one action string per chunk from stdin
    out: str = "out/infer.mp4"


def default_ckpt():
    for name in ("dmd", "cd", "ode", "ar"):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", name)
        if os.path.exists(path + ".safetensors"):
            return path
    common.die("no --ckpt given and no shipped checkpoint in assets/")


def read_image(path, height, width):
    """An image file -> (3, H, W) in [-1, 1], resized to cover and centre-cropped."""
    from PIL import Image
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        common.die(f"--image {path}: cannot read ({e})")
    s = max(height / img.height, width / img.width)
    img = img.resize((max(width, round(img.width * s)), max(height, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    x = torch.tensor(list(img.crop((left, top, left + width, top + height)).getdata()), dtype=torch.float32)
    return (x.view(height, width, 3).permute(2, 0, 1) / 127.5 - 1).clamp(-1, 1)


def action_lines(chunk):
    """--interactive: yields per-chunk step lists (chunk - 1 steps for the first chunk, then chunk)."""
    need = chunk - 1
    for line in sys.stdin:
        line = line.strip()
        if not line or line == "q":
            return
        try:
            steps = cameras.parse_actions(line)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)  # a typo ends nothing: ask for the next line
            continue
        steps = (steps + [steps[-1]] * need)[:need]  # one line = one chunk: pad with its last step
        yield steps
        need = chunk


def pitch0(cfg):
    return 0.0 if cfg.image else world.START_PITCH  # typed paths start from the procedural start pose


def load_path(cfg, src):
    """A camera file or an action string -> Cameras (1, F), at this config's step sizes and frame size."""
    return cameras.load_cameras(src, cfg.trans_step, cfg.rot_step, cfg.width, cfg.height, pitch0=pitch0(cfg))


def walker(cfg):
    """Action steps -> cameras, chunk by chunk (--interactive, play.py): the same poses as load_path."""
    return cameras.Walker(cfg.trans_step, cfg.rot_step, pitch0(cfg))


def load_model(cfg, device):
    """The checkpoint (--ckpt or the shipped one) and its codec -> (net, codec, ckpt); a bad one dies in one line."""
    if cfg.sampler not in ("few", "euler"):
        common.die(f"--sampler must be few or euler, got {cfg.sampler!r}")
    ckpt = cfg.ckpt or default_ckpt()
    net = common.or_die(M.load_pretrained, ckpt).to(device).eval()
    mc = net.cfg
    if cfg.vae:
        codec = data.WanVAECodec.load(common.check_file(cfg.vae, "--vae folder"))
    elif mc.out_channels == 3 * 2 * 2:
        codec = data.PixelCodec(2)
    else:
        common.die(f"{ckpt}: latents have {mc.out_channels} channels; pass --vae=FOLDER (Wan VAE)")
    if cfg.height % (codec.spatial * mc.patch_size[1]) or cfg.width % (codec.spatial * mc.patch_size[2]):
        common.die(f"--height/--width must be multiples of {codec.spatial * mc.patch_size[1]} for this model")
    return net, codec, ckpt


def first_frame(cfg, cams):
    """(3, H, W) in [-1, 1]: --image, or the procedural scene seen by the first of `cams`."""
    if cfg.image:
        return read_image(common.check_file(cfg.image, "--image"), cfg.height, cfg.width)
    return world.render_world(cfg.scene_seed, cams.frames(0, 1), cfg.height, cfg.width)[:, 0]


def text_embedding(cfg, text_dim):
    """(1, L, text_dim): --text_emb, or --prompt (the scene's caption if none) through the text encoder."""
    caption = cfg.prompt or ("" if cfg.image else world.caption(cfg.scene_seed))
    if cfg.text_emb:
        from safetensors.torch import load_file
        try:
            text = next(iter(load_file(common.check_file(cfg.text_emb, "--text_emb")).values()))
        except Exception as e:
            common.die(f"--text_emb {cfg.text_emb}: not a readable .safetensors file ({str(e).splitlines()[0]})")
    elif cfg.text_encoder:
        text = data.load_text_encoder(cfg.text_encoder, cfg.text_len, text_dim)(caption)
    else:
        text = world.text_embedding(caption, text_dim, cfg.text_len)
    if text.ndim != 2 or text.shape[1] != text_dim:
        common.die(f"text embedding must be (L, {text_dim}), got {tuple(text.shape)}")
    return text[None].float()


@dataclass
class Stream:
    """One rollout in flight, stepped chunk by chunk: what infer.py's loop and play.py's server share.

    It holds everything that carries from one chunk to the next: the model and codec, the first
    frame and its latent (the image condition of every chunk), the text, the KV cache (sink + a ring
    of `window` recent frames: flat memory however long it runs), the noise generator and `start`,
    the absolute index of the next latent frame. The same cameras and seed give the same frames,
    whoever steps it.
    """
    net: torch.nn.Module
    codec: object  # data.PixelCodec or data.WanVAECodec
    frame0: torch.Tensor  # (3, H, W) in [-1, 1]: the given first frame, shown exactly
    first: torch.Tensor  # (1, C, h, w): its latent
    text: torch.Tensor  # (1, L, D)
    cache: M.KVCache
    gen: torch.Generator  # every noise draw of the rollout, in order
    sigmas: list
    renoise: bool  # the few-step sampler (x0, then fresh noise) or Euler
    start: int = 0  # absolute index of the next latent frame
    latency: float = 0.0  # seconds the last step took

    def step(self, cams):
        """Cameras (1, n) of latent frames [start, start + n), n <= chunk -> frames (T, H, W, 3) uint8."""
        mc, n = self.net.cfg, cams.num_frames
        h, w = self.first.shape[-2:]
        noise = torch.randn((1, mc.out_channels, n, h, w), generator=self.gen, device=self.first.device)
        t0 = time.perf_counter()
        cond = M.image_cond(self.first, n, self.start) if mc.image_cond else None  # T2V checkpoints: none
        x = M.generate_chunk(self.net, self.cache, noise, self.start, self.text, cams.to(self.first.device), cond,
                             self.sigmas, renoise=self.renoise, generator=self.gen)
        with torch.no_grad():
            video = self.codec.decode(x)[0].clamp(-1, 1)  # (3, T, H, W)
        if self.start == 0:
            video[:, 0] = self.frame0.to(video)  # the given first frame, exactly
        frames = ((video + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
        self.latency = time.perf_counter() - t0
        self.start += n
        return frames


def open_stream(cfg, net, codec, cams):
    """A fresh rollout from frame 0 (seen by the first of `cams`): first frame, text, empty cache, seeded noise."""
    device = next(net.parameters()).device
    frame0 = first_frame(cfg, cams)
    text = text_embedding(cfg, net.cfg.text_dim).to(device)
    with torch.no_grad():
        first = codec.encode(frame0[None, :, None].to(device))[:, :, 0]  # (1, C, h, w)
    h, w = first.shape[-2:]
    sigmas = M.few_step_sigmas(cfg.timesteps, cfg.shift) if cfg.sampler == "few" else M.euler_sigmas(cfg.steps, cfg.shift)
    cache = net.new_cache(1, h, w, sink=cfg.sink, window=cfg.window, device=device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    return Stream(net, codec, frame0, first, text, cache, gen, sigmas, renoise=cfg.sampler == "few")


class Writers:
    """STEM.mp4 + STEM.gif, appended frame by frame, each scaled up (nearest: crisp pixels) to about 256 px."""

    def __init__(self, stem, fps, height):
        import imageio.v2 as imageio
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        self.scale = max(1, 256 // height)
        self.mp4 = imageio.get_writer(stem + ".mp4", fps=fps, macro_block_size=1)
        self.gif = imageio.get_writer(stem + ".gif", mode="I", duration=1000 / fps, loop=0)

    def append(self, frame):  # (H, W, 3) uint8
        big = frame.repeat(self.scale, 0).repeat(self.scale, 1)
        self.mp4.append_data(big)
        self.gif.append_data(big)

    def close(self):
        self.mp4.close()
        self.gif.close()


def main():
    cfg = common.parse_config(Config)
    rank, local_rank, world_size, device = common.setup_ddp(cfg.device or None)
    torch.manual_seed(cfg.seed)
    if sum(map(bool, (cfg.cameras, cfg.actions, cfg.interactive))) != 1:
        common.die("give exactly one of --cameras FILE, --actions STRING or --interactive")
    net, codec, ckpt = load_model(cfg, device)
    chunk = net.cfg.chunk
    load = lambda src: load_path(cfg, src)
    if cfg.cameras:
        common.check_file(cfg.cameras, "--cameras file")
    path = None if cfg.interactive else common.or_die(load, cfg.cameras or cfg.actions)  # Cameras (1, F)
    stream = open_stream(cfg, net, codec, load("x") if path is None else path)

    # the chunks' cameras: slices of the path, or walked on from each stdin line
    if path is not None:
        chunks = (path.frames(s, s + chunk) for s in range(0, path.num_frames, chunk))
        bar = common.progress(-(-path.num_frames // chunk), desc="chunks", unit="chunk")
    else:
        walk = walker(cfg)
        chunks, bar = (walk.cameras(steps, cfg.width, cfg.height) for steps in action_lines(chunk)), None

    # stream
    stem = os.path.splitext(cfg.out)[0]
    out = Writers(stem, cfg.fps, cfg.height)
    latencies, seen, t_begin = [], [], time.perf_counter()
    for cams in chunks:
        for frame in stream.step(cams):
            out.append(frame)
        latencies.append(stream.latency)
        seen.append(cams)
        if bar is not None:
            bar.update(1)
        else:
            print(f"chunk {len(latencies)}: frames {stream.start - cams.num_frames}..{stream.start - 1} in "
                  f"{latencies[-1] * 1000:.0f} ms", flush=True)
    out.close()
    if bar is not None:
        bar.close()
    if not latencies:
        common.die("no actions were given on stdin")
    total_time = time.perf_counter() - t_begin
    final_cams = path if path is not None else Cameras(torch.cat([c.w2c for c in seen], 1), torch.cat([c.K for c in seen], 1))
    cameras.plot_trajectory(final_cams, stem + "_path.png", title=os.path.basename(stem))
    report = dict(settings={**asdict(cfg), "ckpt": ckpt, "chunk": chunk, "sigmas": stream.sigmas},
                  frames=stream.start, chunks=len(latencies), first_chunk_latency_s=latencies[0],
                  chunk_latency_s=latencies, fps=stream.start / sum(latencies), wall_s=total_time,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {stem}.mp4/.gif/_path.png/.json: {stream.start} latent frames in {len(latencies)} chunks, "
          f"first chunk {latencies[0] * 1000:.0f} ms, {report['fps']:.1f} latent frames/s")


if __name__ == "__main__":
    main()
