"""Performance, measured side by side in one run so the ratios mean something on any machine.

    python bench.py                 # CPU here; on a GPU pass --device=cuda
    python bench.py --quick         # fewer repeats

1. the procedural world's render speed (frames/s) against a tiny training step's appetite;
2. one training step (forward + backward, batch 8) with PRoPE inline / as a branch / off;
3. first-chunk latency of the 4-step AR model (KV cache) vs the bidirectional model's 50-step whole clip;
4. one chunk through the KV cache vs recomputing the whole prefix (what the cache saves per chunk).
Latency does not depend on the weights: the shipped checkpoints are used when present, else random ones.
"""
import os
import statistics
import time
from dataclasses import dataclass

import torch

import cameras
import common
import data
import model as M
import prope
import world


@dataclass
class Config:
    repeats: int = 5
    batch_size: int = 8
    frames: int = 8
    long_frames: int = 32  # prefix length for the cache comparison
    quick: bool = False
    device: str = ""


def timed(fn, repeats, device):
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_or_random(name, **cfg):
    path = os.path.join("assets", name)
    return M.load_pretrained(path) if os.path.exists(path + ".safetensors") else M.DiT(M.make_config("tiny", **cfg))


def main():
    cfg = common.parse_config(Config, quick=dict(repeats=2, long_frames=16))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    B, F_ = cfg.batch_size, cfg.frames
    stage = common.StageConfig(batch_size=B, frames=F_)  # the embedded world's clip size and text length
    H, W = stage.height, stage.width
    codec, source = data.training_source(stage, M.make_config("tiny"))
    rows = []

    # 1. data: a training batch rendered by the procedural world
    t = timed(lambda: source(0, 0, 1), cfg.repeats, device)
    rows.append((f"render a batch ({B} clips x {F_} frames, {H}x{W})", t, f"{B * F_ / t:.0f} frames/s"))

    # 2. a training step per PRoPE placement
    b = source(0, 0, 1, device)
    x0, cams, text = b["x0"], b["cameras"], b["text"]
    cond = M.image_cond(x0[:, :, 0], F_)
    step_times = {}
    for placement in ("none", "inline", "branch"):
        net = M.DiT(M.make_config("tiny", prope=placement)).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step():
            loss = net(x0, torch.full((B,), 500.0, device=device), text, cams, cond).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        step_times[placement] = timed(step, cfg.repeats, device)
        rows.append((f"train step, PRoPE {placement}", step_times[placement],
                     f"x{step_times[placement] / step_times['none']:.2f} of no PRoPE"))

    # 3. first-chunk latency: few-step AR with cache vs the bidirectional 50-step whole clip
    ar = load_or_random("dmd").to(device).eval()
    bidir = load_or_random("bidir").to(device).eval()
    one = slice(0, 1)
    h, w = x0.shape[-2:]  # latent size
    noise = torch.randn(1, ar.cfg.out_channels, F_, h, w, device=device)
    c1, t1, cond1 = cams.frames(0, F_), text[one], cond[one]
    c1 = prope.Cameras(c1.w2c[one], c1.K[one])
    few = M.few_step_sigmas(M.FEW_STEP_TIMESTEPS)

    def first_chunk():
        cache = ar.new_cache(1, h, w, device=device)
        M.generate_chunk(ar, cache, noise[:, :, :ar.cfg.chunk], 0, t1, c1.frames(0, ar.cfg.chunk),
                         cond1[:, :, :ar.cfg.chunk], few, renoise=True)
    t_ar = timed(first_chunk, cfg.repeats, device)
    t_bi = timed(lambda: M.sample_bidir(bidir, noise, t1, c1, cond1, M.euler_sigmas(50)), max(1, cfg.repeats // 2), device)
    rows.append(("first chunk, 4-step AR + KV cache", t_ar, ""))
    rows.append(("whole clip, bidirectional 50 steps", t_bi, f"first-frame latency x{t_bi / t_ar:.0f} lower with AR"))

    # 4. a chunk after a long prefix: through the cache vs recomputing the prefix under teacher forcing
    L = cfg.long_frames
    long_cams = cameras.load_cameras(f"w*{L - 1}", pitch0=world.START_PITCH).to(device)
    lx = torch.randn(1, ar.cfg.out_channels, L, h, w, device=device)
    lcond = M.image_cond(lx[:, :, 0], L)
    with torch.no_grad():
        cache = ar.new_cache(1, h, w, window=L, device=device)
        for s in range(0, L - ar.cfg.chunk, ar.cfg.chunk):
            ar(lx[:, :, s:s + ar.cfg.chunk], torch.zeros(1, device=device), t1, long_cams.frames(s, s + ar.cfg.chunk),
               lcond[:, :, s:s + ar.cfg.chunk], cache=cache, frame_offset=s, commit=True)
    s = L - ar.cfg.chunk
    with torch.no_grad():
        t_cache = timed(lambda: ar(lx[:, :, s:], torch.full((1,), 500.0, device=device), t1, long_cams.frames(s, L),
                                   lcond[:, :, s:], cache=cache, frame_offset=s), cfg.repeats, device)
        t_full = timed(lambda: ar(lx, torch.full((1, L), 500.0, device=device), t1, long_cams, lcond, clean=lx),
                       cfg.repeats, device)
    rows.append((f"one denoising step of the last chunk, {L}-frame prefix, KV cache", t_cache, ""))
    rows.append(("same, recomputing the prefix (teacher-forcing forward)", t_full, f"x{t_full / t_cache:.1f} slower"))

    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| measurement | time | ratio |\n| --- | --- | --- |")
    for name, t, note in rows:
        print(f"| {name} | {t * 1000:.1f} ms | {note} |")


if __name__ == "__main__":
    main()
