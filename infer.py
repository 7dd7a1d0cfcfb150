"""Stream a camera-controlled video from an AR checkpoint, chunk by chunk, through the KV cache.

    python infer.py --cameras assets/orbit.json               # any format cameras.load_cameras reads
    python infer.py --actions "w*8,j*4" --scene_seed 1000000003
    python infer.py --interactive                             # one action line on stdin -> one chunk
    python infer.py --ckpt wan_minwm.safetensors --vae Wan2.1-VAE/ --image first.png --prompt "..." \
                    --text_encoder umt5/ --cameras traj.json --height 480 --width 832

Writes OUT.mp4, OUT.gif, OUT_path.png (top-down camera path) and OUT.json (settings, first-chunk
latency, per-chunk latency, FPS). The cache keeps `sink` frames and a `window` of recent frames, so
an arbitrarily long camera file streams in bounded memory; frames are written as they come.
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


@dataclass
class Config:
    ckpt: str = ""  # "" = the shipped model: the latest of assets/{dmd,cd,ode,ar}
    cameras: str = ""  # a camera file: JSON v1, HY-WorldPlay pose JSON or RealEstate10K txt
    actions: str = ""  # or an action string: w/s a/d u/n j/l i/k x, e.g. "w*8,j*4"
    interactive: bool = False  # or read one action string per chunk from stdin
    image: str = ""  # first frame (PNG/JPG); "" = a procedural scene
    scene_seed: int = 1_000_000_003  # procedural scene (seeds >= 10**9 are held out from training)
    prompt: str = ""  # text; "" = the procedural scene's caption
    text_encoder: str = ""  # (U)T5 folder for --prompt on real checkpoints ("" = the toy hash embedding)
    text_emb: str = ""  # precomputed text embedding (.safetensors, first tensor, (L, D))
    vae: str = ""  # Wan VAE folder (AutoencoderKLWan) for checkpoints with 16-channel latents
    out: str = "out/infer.mp4"
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


def main():
    cfg = common.parse_config(Config)
    rank, local_rank, world_size, device = common.setup_ddp(cfg.device or None)
    torch.manual_seed(cfg.seed)
    if sum(map(bool, (cfg.cameras, cfg.actions, cfg.interactive))) != 1:
        common.die("give exactly one of --cameras FILE, --actions STRING or --interactive")
    ckpt = cfg.ckpt or default_ckpt()
    net = common.or_die(M.load_pretrained, ckpt).to(device).eval()
    mc = net.cfg
    chunk = mc.chunk
    if cfg.vae:
        codec = data.WanVAECodec.load(common.check_file(cfg.vae, "--vae folder"))
    elif mc.out_channels == 3 * 2 * 2:
        codec = data.PixelCodec(2)
    else:
        common.die(f"{ckpt}: latents have {mc.out_channels} channels; pass --vae=FOLDER (Wan VAE)")
    if cfg.height % (codec.spatial * mc.patch_size[1]) or cfg.width % (codec.spatial * mc.patch_size[2]):
        common.die(f"--height/--width must be multiples of {codec.spatial * mc.patch_size[1]} for this model")
    pitch0 = 0.0 if cfg.image else world.START_PITCH  # typed paths start from the procedural start pose
    load = lambda src: cameras.load_cameras(src, cfg.trans_step, cfg.rot_step, cfg.width, cfg.height, pitch0=pitch0)
    if cfg.cameras:
        common.check_file(cfg.cameras, "--cameras file")
    path = None if cfg.interactive else common.or_die(load, cfg.cameras or cfg.actions)  # Cameras (1, F)

    # first frame and text
    first_cams = load("x") if path is None else path
    if cfg.image:
        frame0 = read_image(common.check_file(cfg.image, "--image"), cfg.height, cfg.width)
    else:
        frame0 = world.render_world(cfg.scene_seed, first_cams.frames(0, 1), cfg.height, cfg.width)[:, 0]
    caption = cfg.prompt or ("" if cfg.image else world.caption(cfg.scene_seed))
    if cfg.text_emb:
        from safetensors.torch import load_file
        try:
            text = next(iter(load_file(common.check_file(cfg.text_emb, "--text_emb")).values()))
        except Exception as e:
            common.die(f"--text_emb {cfg.text_emb}: not a readable .safetensors file ({str(e).splitlines()[0]})")
    elif cfg.text_encoder:
        text = data.load_text_encoder(cfg.text_encoder, cfg.text_len, mc.text_dim)(caption)
    else:
        text = world.text_embedding(caption, mc.text_dim, cfg.text_len)
    if text.ndim != 2 or text.shape[1] != mc.text_dim:
        common.die(f"text embedding must be (L, {mc.text_dim}), got {tuple(text.shape)}")
    text = text[None].float().to(device)
    with torch.no_grad():
        first = codec.encode(frame0[None, :, None].to(device))[:, :, 0]  # (1, C, h, w)
    h, w = first.shape[-2:]
    sigmas = M.few_step_sigmas(cfg.timesteps, cfg.shift) if cfg.sampler == "few" else M.euler_sigmas(cfg.steps, cfg.shift)

    # stream
    stem = os.path.splitext(cfg.out)[0]
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    import imageio.v2 as imageio
    mp4 = imageio.get_writer(stem + ".mp4", fps=cfg.fps, macro_block_size=1)
    gif = imageio.get_writer(stem + ".gif", mode="I", duration=1000 / cfg.fps, loop=0)
    cache = net.new_cache(1, h, w, sink=cfg.sink, window=cfg.window, device=device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    latencies, all_steps, start, t_begin = [], [], 0, time.perf_counter()
    if path is not None:
        total = path.num_frames
        chunks = iter([None] * -(-total // chunk))
        bar = common.progress(-(-total // chunk), desc="chunks", unit="chunk")
    else:
        chunks, bar = action_lines(chunk), None
    for steps in chunks:
        if steps is not None:  # interactive: the cameras grow by this line's steps
            all_steps += steps
            cams_all = load(",".join(all_steps)) if all_steps else load("x").frames(0, 1)
            stop = cams_all.num_frames
        else:
            cams_all, stop = path, min(start + chunk, path.num_frames)
        c_cams = cams_all.frames(start, stop).to(device)
        noise = torch.randn((1, mc.out_channels, stop - start, h, w), generator=gen, device=device)
        t0 = time.perf_counter()
        cond = M.image_cond(first, stop - start, start) if mc.image_cond else None  # T2V checkpoints: none
        x = M.generate_chunk(net, cache, noise, start, text, c_cams, cond, sigmas, renoise=cfg.sampler == "few",
                             generator=gen)
        with torch.no_grad():
            video = codec.decode(x)[0].clamp(-1, 1)  # (3, T, H, W)
        if start == 0:
            video[:, 0] = frame0.to(video)  # the given first frame, exactly
        latencies.append(time.perf_counter() - t0)
        for frame in ((video + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy():
            big = frame.repeat(max(1, 256 // cfg.height), 0).repeat(max(1, 256 // cfg.height), 1)
            mp4.append_data(big)
            gif.append_data(big)
        if bar is not None:
            bar.update(1)
        else:
            print(f"chunk {len(latencies)}: frames {start}..{stop - 1} in {latencies[-1] * 1000:.0f} ms", flush=True)
        start = stop
        final_cams = cams_all
    mp4.close()
    gif.close()
    if bar is not None:
        bar.close()
    if not latencies:
        common.die("no actions were given on stdin")
    total_time = time.perf_counter() - t_begin
    cameras.plot_trajectory(final_cams, stem + "_path.png", title=os.path.basename(stem))
    report = dict(settings={**asdict(cfg), "ckpt": ckpt, "chunk": chunk, "sigmas": sigmas},
                  frames=start, chunks=len(latencies), first_chunk_latency_s=latencies[0],
                  chunk_latency_s=latencies, fps=start / sum(latencies), wall_s=total_time,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {stem}.mp4/.gif/_path.png/.json: {start} latent frames in {len(latencies)} chunks, "
          f"first chunk {latencies[0] * 1000:.0f} ms, {report['fps']:.1f} latent frames/s")


if __name__ == "__main__":
    main()
