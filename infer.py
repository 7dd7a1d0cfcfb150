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
import math
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
    timesteps: tuple[int, ...] = M.FEW_STEP_TIMESTEPS
    steps: int = 25
    shift: float = 1.0
    sink: int = M.STREAM_SINK  # latent frames always kept in the cache
    window: int = M.STREAM_WINDOW  # latent frames of recent context kept in the cache
    height: int = 32  # output pixels
    width: int = 32
    text_len: int = 0  # text tokens; 0 = the checkpoint's (common.input_text_len)
    trans_step: float = 0.25  # metres per action step
    rot_step: float = 5.0  # degrees per action step
    fps: int = 8
    seed: int = 0
    device: str = ""
    dtype: str = ""  # fp32 | bf16; "" = bf16 on CUDA (the weights cast once), fp32 on the CPU
    compile: bool = False  # torch.compile the DiT (minutes of compiling first): a tiny model is bound by launches
    threads: int = 0  # torch CPU threads; 0 = 1 for a small model (a second thread buys it nothing, and
    #                   on a busy machine two threads can be many times slower), torch's default otherwise
    model_config: str = ""  # for a --ckpt that carries no config: a checkpoint's JSON or ModelConfig fields


MAX_SIDE = 2048  # pixels: the procedural world ray casts 4 rays per pixel; larger frames exhaust memory
SMALL_MODEL = 50e6  # parameters: below it a CPU rollout runs on one thread


def check_stream_config(cfg):
    """Refuse, in one line each, settings that cannot give a meaningful video (before loading anything)."""
    timesteps_problem = common.timesteps_problem(cfg.timesteps)
    checks = [
        (cfg.sampler in ("few", "euler"), f"--sampler must be few or euler, got {cfg.sampler!r}"),
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        (not timesteps_problem, timesteps_problem),
        (math.isfinite(cfg.shift) and cfg.shift > 0, f"--shift must be a finite number > 0, got {cfg.shift}"),
        (cfg.sink >= 0, f"--sink must be at least 0, got {cfg.sink}"),
        (cfg.window >= 1, f"--window must be at least 1 frame, got {cfg.window}"),
        (1 <= cfg.height <= MAX_SIDE and 1 <= cfg.width <= MAX_SIDE,
         f"--height/--width must be 1..{MAX_SIDE} pixels, got {cfg.height}x{cfg.width}"),
        (0 <= cfg.text_len <= 4096, f"--text_len must be 0..4096 (0 = the checkpoint's), got {cfg.text_len}"),
        (1 <= cfg.fps <= 240, f"--fps must be 1..240, got {cfg.fps}"),
        (cfg.seed >= 0 and cfg.scene_seed >= 0, f"--seed and --scene_seed must be >= 0, got {cfg.seed}, {cfg.scene_seed}"),
        (math.isfinite(cfg.trans_step) and math.isfinite(cfg.rot_step),
         f"--trans_step/--rot_step must be finite, got {cfg.trans_step}, {cfg.rot_step}"),
        (cfg.threads >= 0, f"--threads must be at least 0 (0 = automatic), got {cfg.threads}"),
        (cfg.dtype in ("", "fp32", "bf16"), f"--dtype must be fp32 or bf16, got {cfg.dtype!r}"),
    ]
    for ok, message in checks:
        if not ok:
            common.die(message)


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


def action_lines():
    """--interactive: the action steps of each stdin line (a prompt when stdin is a terminal). An empty
    line stands still for one step ("x", like no key in play.py); "q" or the end of input stops; a
    typo is reported and the next line is read."""
    while True:
        if sys.stdin.isatty():
            print("action (w/s a/d u/n j/l i/k x, q to stop)> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "q":
            return
        try:
            yield cameras.parse_actions(line.strip() or "x")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)  # a typo ends nothing: ask for the next line


def interactive_chunks(walk, chunk, width, height):
    """Cameras of each chunk from the stdin lines: the first chunk takes chunk - 1 steps (frame 0 is
    given), every later one `chunk`; a line with more steps than that fills several chunks, and a
    shorter one repeats its last step (a held key)."""
    need = chunk - 1
    for steps in action_lines():
        if len(steps) > need:
            print(f"note: {len(steps)} steps fill {1 + -(-(len(steps) - need) // chunk)} chunks", file=sys.stderr,
                  flush=True)
        while True:
            take, steps = steps[:need], steps[need:]
            yield walk.cameras(take + [take[-1]] * (need - len(take)), width, height)
            need = chunk
            if not steps:
                break


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
    check_stream_config(cfg)
    ckpt = cfg.ckpt or default_ckpt()
    if cfg.text_len == 0:
        cfg.text_len = common.input_text_len(ckpt)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    net = common.or_die(M.load_pretrained, ckpt, model_config=cfg.model_config or None).to(device, dtype).eval()
    if cfg.compile:
        net.compile(dynamic=None)  # automatic dynamic shapes: the cache length and frame offset of each chunk become
        #                            symbols after their first change (dynamic=False recompiled for every offset until
        #                            torch gave up and ran eager: slower than no compile)
    mc = net.cfg
    if cfg.window < mc.chunk:
        common.die(f"--window={cfg.window} is shorter than a chunk ({mc.chunk} latent frames): "
                   f"a chunk would not even see the one before it")
    if device.type == "cpu":  # see StreamConfig.threads
        torch.set_num_threads(cfg.threads or (1 if net.num_params() < SMALL_MODEL else torch.get_num_threads()))
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
    decoder: object  # codec.stream(): decodes chunk after chunk as one video (Wan's causal cache: no seams)
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
            video = self.decoder.decode(x)[0].clamp(-1, 1)  # (3, T, H, W)
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
    return Stream(net, codec, codec.stream(), frame0, first, text, cache, gen, sigmas, renoise=cfg.sampler == "few")


def check_outputs(cfg, ckpt, stem):
    """The files this run writes must not be its inputs or a checkpoint, and their folder must be writable."""
    if not os.path.basename(stem) or cfg.out.endswith(os.sep):
        common.die(f"--out={cfg.out} must name a file, e.g. out/video.mp4")
    folder = os.path.dirname(stem) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        common.die(f"--out={cfg.out}: {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        common.die(f"--out={cfg.out}: cannot make the folder {folder} ({e.strerror})")
    if not os.access(folder, os.W_OK):
        common.die(f"--out={cfg.out}: the folder {folder} is not writable")
    inputs = {os.path.abspath(p) for p in (cfg.cameras, cfg.image, cfg.text_emb, cfg.model_config) if p}
    inputs |= {os.path.abspath(common.stem_of(ckpt) + ext) for ext in (".json", ".safetensors", ".opt.pt")
               if os.path.isfile(common.stem_of(ckpt) + ext)}
    for out in (stem + ".mp4", stem + ".gif", stem + "_path.png", stem + ".json"):
        if os.path.abspath(out) in inputs:
            common.die(f"--out={cfg.out} would overwrite {out}, an input of this run: choose another --out")
        if out.endswith(".json") and os.path.exists(out):
            try:
                doc = json.load(open(out))
            except (OSError, ValueError):
                doc = None
            if isinstance(doc, dict) and "model" in doc and "stage" in doc:
                common.die(f"--out={cfg.out} would overwrite {out}, a checkpoint's JSON: choose another --out")


def main():
    cfg = common.parse_config(Config)
    rank, local_rank, world_size, device = common.setup_ddp(cfg.device or None)
    torch.manual_seed(cfg.seed)
    if sum(map(bool, (cfg.cameras, cfg.actions, cfg.interactive))) != 1:
        common.die("give exactly one of --cameras FILE, --actions STRING or --interactive")
    if cfg.cameras:
        common.check_file(cfg.cameras, "--cameras file")
    net, codec, ckpt = load_model(cfg, device)
    chunk = net.cfg.chunk
    stem = os.path.splitext(cfg.out)[0]
    check_outputs(cfg, ckpt, stem)
    load = lambda src: load_path(cfg, src)
    path = None if cfg.interactive else common.or_die(load, cfg.cameras or cfg.actions)  # Cameras (1, F)
    stream = open_stream(cfg, net, codec, load("x") if path is None else path)

    # the chunks' cameras: slices of the path, or walked on from each stdin line
    if path is not None:
        n_chunks = -(-path.num_frames // chunk)
        chunks = (path.frames(s, s + chunk) for s in range(0, path.num_frames, chunk))
        bar = common.progress(n_chunks, desc="chunks", unit="chunk")
        print(f"streaming {path.num_frames} latent frames in {n_chunks} chunks of {chunk} with {os.path.basename(ckpt)}",
              file=sys.stderr, flush=True)
    else:
        chunks, bar = interactive_chunks(walker(cfg), chunk, cfg.width, cfg.height), None

    # stream: the video files appear only when the run completes (data.Writers), the old ones stay until then
    out = data.Writers(stem, cfg.fps, cfg.height)
    latencies, seen, t_begin = [], [], time.perf_counter()
    try:
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
        if not latencies:
            common.die("no actions were given on stdin")
        out.close()
    except BaseException:  # an error, Ctrl-C, or the exit above: no partial video over the old one
        out.abort()
        raise
    if bar is not None:
        bar.close()
    total_time = time.perf_counter() - t_begin
    final_cams = path if path is not None else Cameras(torch.cat([c.w2c for c in seen], 1), torch.cat([c.K for c in seen], 1))
    cameras.plot_trajectory(final_cams, stem + "_path.png", title=os.path.basename(stem))
    report = dict(settings={**asdict(cfg), "ckpt": ckpt, "chunk": chunk, "sigmas": stream.sigmas},
                  frames=stream.start, chunks=len(latencies), first_chunk_latency_s=latencies[0],
                  chunk_latency_s=latencies, fps=stream.start / sum(latencies), wall_s=total_time,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  gif_frames=min(out.frames, data.MAX_GIF_FRAMES))
    common.atomic_write(stem + ".json", lambda p: open(p, "w").write(json.dumps(report, indent=1)))
    note = f" (the gif holds the first {data.MAX_GIF_FRAMES} frames)" if out.gif_capped else ""
    print(f"wrote {stem}.mp4/.gif/_path.png/.json: {stream.start} latent frames in {len(latencies)} chunks, "
          f"first chunk {latencies[0] * 1000:.0f} ms, {report['fps']:.1f} latent frames/s{note}")


if __name__ == "__main__":
    main()
