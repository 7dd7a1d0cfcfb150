"""Data for training: where a batch comes from, the latent codecs, and real-video caches.

`training_source(cfg, model_cfg)` is what every stage calls: it returns the codec and a function
`source(step, rank, world)` giving this rank's share of global batch `step`, from the procedural
world (`world.py`, the default) or from a cache of real videos (`--data=DIR`, made by
`python data.py prepare`). Every sample depends only on (seed, global sample index).

Codecs map video (B, 3, T, H, W) in [-1, 1] to latents (B, C, F, h, w) and back: `PixelCodec`
(space-to-depth, exact; the embedded world) and `WanVAECodec` (Wan2.1's VAE with its latent
normalization). `save_video` writes mp4 / gif for a person to watch.

    python data.py prepare --src DIR --out DIR     # cache latents, cameras and text of real videos
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

import world
from prope import Cameras
from cameras import load_cameras, normalize_scale, perturb_cameras
from common import TEXT_LEN, atomic_write, mix_seed


# ----------------------------------------------------------------------------------------------
# what the training stages read

def training_source(cfg, model_cfg, shown=False):
    """(codec, source) for a training stage; source(step, rank, world_size) -> this rank's share of batch `step`.

    Every sample - its clip, noise, uniforms for sigma, caption dropout, camera jitter - comes from
    (cfg.seed, global sample index) alone, so a run gives the same steps on 1 or N processes and
    `--resume` continues exactly. Returns dict x0 (B, C, F, h, w), noise like x0, u (B, F) uniforms
    for the stage's sigma sampling, text (B, L, D) (zeros where dropped), cameras (Cameras); with shown=True
    (the embedded world only) also x0_shown like x0: the clip with the objects frame 0 does not show left out.
    cfg needs: seed, batch_size, frames, height, width, text_len, text_drop, camera_noise, data.
    """
    text_len = cfg.text_len or TEXT_LEN  # 0: common.start gives a stage its input's; a config used directly, from scratch's
    if cfg.data and shown:
        raise ValueError("shown: only the embedded world knows what frame 0 does not show (no --data)")
    if cfg.data:
        dataset = LatentDataset(cfg.data)
        codec = None  # latents come prepared; nothing to decode while training
    else:
        codec = PixelCodec(2)

    def one(g):
        generator = torch.Generator().manual_seed(mix_seed(cfg.seed, g, 7))
        if cfg.data:
            item = dataset[int(torch.randint(len(dataset), (1,), generator=generator))]
            x0, w2c, K, text = item["latents"].float(), item["w2c"], item["K"], item["text"]
        else:
            clip = world.make_clip(cfg.seed, g, cfg.frames, cfg.height, cfg.width, model_cfg.text_dim, text_len,
                                   getattr(cfg, "wander", False), getattr(cfg, "reveal", 0.0), shown)
            x0 = codec.encode(clip["video"][None])[0]
            w2c, K, text = clip["w2c"], clip["K"], clip["text"]
        if cfg.camera_noise > 0 or getattr(cfg, "camera_scale_drift", 0) > 0:
            w2c = perturb_cameras(w2c, cfg.camera_noise, generator, getattr(cfg, "camera_scale_drift", 0))
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.rand(x0.shape[1], generator=generator)
        if torch.rand((), generator=generator) < cfg.text_drop:
            text = torch.zeros_like(text)
        # the teacher-forcing context's own noise (model.noisy_context), drawn after the rest so that
        # the draws above are those of a run without it
        noise_context, u_context = torch.randn(x0.shape, generator=generator), torch.rand(x0.shape[1], generator=generator)
        out = dict(x0=x0, noise=noise, u=u, text=text, w2c=w2c, K=K, noise_context=noise_context, u_context=u_context)
        return {**out, "x0_shown": codec.encode(clip["shown"][None])[0]} if shown else out

    def source(step, rank, world_size, device="cpu"):
        B = cfg.batch_size // world_size
        items = [one(step * cfg.batch_size + rank * B + i) for i in range(B)]
        b = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
        b["cameras"] = Cameras(b.pop("w2c"), b.pop("K"))
        return b

    return codec, source


# ----------------------------------------------------------------------------------------------
# codecs: video (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, F, h, w)

WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


class PixelCodec:
    """Parameter-free space-to-depth: each factor x factor patch becomes 3·factor² channels; exact.
    Frame by frame, so a streamed video decodes chunk by chunk as it is (`stream` returns the codec)."""

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

    def stream(self):
        return self


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
        return self.normalize(mu)

    @torch.no_grad()
    def decode(self, latents):
        z = self.denormalize(latents)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    def normalize(self, mu):
        """The VAE's latents -> normalized ones, on their device (the constants are CPU tensors)."""
        return (mu - self.mean.to(mu.device)) / self.std.to(mu.device)

    def denormalize(self, latents):
        """Normalized latents -> the VAE's own latent scale (the inverse of normalize), on their device."""
        return latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)

    def stream(self):
        """A decoder for latents that arrive chunk by chunk (streaming): see WanStreamDecoder."""
        return WanStreamDecoder(self)


class WanStreamDecoder:
    """Decode a streamed video chunk by chunk with Wan's causal decoder, keeping the cache of its
    causal convolutions between chunks, so the frames equal the whole-clip decode (no seams where
    chunks meet; decoding each chunk alone restarts the decoder as at frame 0).

    diffusers' AutoencoderKLWan decodes a clip one latent frame at a time through that cache
    (`_decode`); this keeps the cache alive across calls instead of clearing it per call.
    """

    def __init__(self, codec):
        self.codec, self.vae = codec, codec.vae
        self.cache = [None] * self.vae._cached_conv_counts["decoder"]  # one entry per causal conv
        self.started = False

    @torch.no_grad()
    def decode(self, latents):
        """latents (B, C, f, h, w), the next f latent frames -> video (B, 3, T, H, W) in [-1, 1]."""
        z = self.codec.denormalize(latents)
        x = self.vae.post_quant_conv(z.to(self.vae.dtype))
        out = []
        for i in range(x.shape[2]):
            out.append(self.vae.decoder(x[:, :, i:i + 1], feat_cache=self.cache, feat_idx=[0],
                                        first_chunk=not self.started))
            self.started = True
        return torch.cat(out, 2).float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
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
        return lambda text: world.text_embedding(text, text_dim, text_len)
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
        atomic_write(out / shard, lambda tmp: save_file(tensors, tmp))
        index["shards"].append(shard)
        index["items"] += [{"name": name, "shard": shard, "slot": j} for j, (name, _) in enumerate(pending)]
        atomic_write(index_path, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
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


# ----------------------------------------------------------------------------------------------
# video files for people

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



MAX_GIF_FRAMES = 256  # a GIF is held in memory until it is written: longer streams keep their first frames


class Writers:
    """STEM.mp4 + STEM.gif, appended frame by frame, each scaled up (nearest: crisp pixels) to about 256 px.

    Both are written to temporary files beside their targets and renamed into place by close(), so a
    killed or failed run leaves any older STEM.mp4 / STEM.gif as they were (abort() removes the
    temporaries). The mp4 streams to disk; a GIF is held in memory until written, so it keeps the
    first MAX_GIF_FRAMES frames of a longer stream (memory stays flat; the mp4 has every frame).
    """

    def __init__(self, stem, fps, height):
        import imageio.v2 as imageio
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        self.scale = max(1, 256 // height)
        self.targets = [stem + ".mp4", stem + ".gif"]
        self.temps = [f"{stem}.tmp{os.getpid()}{ext}" for ext in (".mp4", ".gif")]  # the suffix names the format
        self.mp4 = imageio.get_writer(self.temps[0], fps=fps, macro_block_size=1)
        self.gif = imageio.get_writer(self.temps[1], mode="I", duration=1000 / fps, loop=0)
        self.frames = 0

    @property
    def gif_capped(self):
        return self.frames > MAX_GIF_FRAMES

    def append(self, frame):  # (H, W, 3) uint8
        big = frame.repeat(self.scale, 0).repeat(self.scale, 1)
        self.mp4.append_data(big)
        if self.frames < MAX_GIF_FRAMES:
            self.gif.append_data(big)
        self.frames += 1

    def close(self):
        self.mp4.close()
        self.gif.close()
        for temp, target in zip(self.temps, self.targets):
            os.replace(temp, target)

    def abort(self):
        for writer in (self.mp4, self.gif):
            try:
                writer.close()
            except Exception:  # a half-written file: it is removed just below anyway
                pass
        for temp in self.temps:
            if os.path.exists(temp):
                os.remove(temp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="minWM data: cache real videos for training")
    sub = parser.add_subparsers(dest="command", required=True)
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
    names = prepare(args.src, args.out, args.vae, args.text_encoder, args.frames, args.height, args.width,
                    args.text_len, args.text_dim, args.shard_size, args.scale)
    print(f"cached {len(names)} new items in {args.out}")
