"""Performance, measured side by side in one run so the ratios mean something on any machine.

    python bench.py                                    # the embedded world's tiny model (CPU here; --device=cuda)
    python bench.py --quick                            # fewer repeats
    python bench.py --preset=wan2.1-t2v-1.3b --json    # Wan2.1-1.3B + PRoPE at 832x480 in bf16 (a CUDA GPU)
    python bench.py --preset=wan2.1-t2v-1.3b --quick   # the same code at a reduced size on the CPU

The tiny model (`bench_tiny`):
1. the procedural world's render speed (frames/s) against a tiny training step's appetite;
2. one training step (forward + backward, batch 8) with PRoPE inline / as a branch / off;
3. first-chunk latency of the 4-step AR model (KV cache) vs the bidirectional model's 50-step whole clip;
4. one chunk through the KV cache vs recomputing the whole prefix (what the cache saves per chunk);
5. the first chunk with a window of 256 vs 8 frames (an empty cache costs what it holds: ~x1).
At scale (`bench_scale`; random weights at the real shape, the streaming setting of the paper: chunks
of 3 latent frames, 4 steps + the commit pass, sink 1 + window 17): ours vs diffusers' forward, the
first and the steady-state chunk, frames/s with and without the streaming VAE decode, the
bidirectional 50-step CFG clip and the first-frame latency ratio, a teacher-forcing forward and a
Stage 1 training step over 21 frames (time, peak memory). `--json` prints them as one JSON object.
Latency does not depend on the weights: the shipped checkpoints are used when present, else random ones.
"""
import json
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
    preset: str = "tiny"  # tiny | wan2.1-t2v-1.3b (random weights at the real shape)
    repeats: int = 5
    batch_size: int = 8
    frames: int = 8
    long_frames: int = 32  # prefix length for the cache comparison
    quick: bool = False
    device: str = ""
    json: bool = False  # also print the numbers as one JSON object (the last line)
    # at scale
    height: int = 480  # video pixels: 832x480 -> 60x104 latents -> 1,560 tokens per latent frame
    width: int = 832
    chunk: int = 3  # latent frames per chunk
    window: int = 17  # latent frames of recent context (with 1 sink frame)
    clip_frames: int = 21  # latent frames of the bidirectional clip, the teacher-forcing forward and the training step
    text_len: int = 512


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


def bench_scale(cfg, device):
    """Wan2.1-T2V-1.3B + a PRoPE branch at cfg.height x cfg.width in bf16 (random weights); with --quick
    a 2-layer model of Wan's head size at a small frame size, in fp32 on the CPU, so CI keeps the code
    working. Returns table rows and the numbers of the issue's keys."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    small = dict(num_layers=2, dim=256, ffn_dim=512, num_heads=2) if cfg.quick else {}
    if cfg.quick:  # 64 x 96 pixels -> 8 x 12 latents; a short clip and text
        cfg.height, cfg.width, cfg.clip_frames, cfg.window, cfg.text_len = 64, 96, 9, 5, 32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = M.make_config(cfg.preset, chunk=cfg.chunk, **small)
    h, w = cfg.height // 8, cfg.width // 8  # Wan VAE: 8x spatial, 4x temporal
    text = torch.randn(1, cfg.text_len, base.text_dim, device=device, dtype=dtype)
    few = M.few_step_sigmas(M.FEW_STEP_TIMESTEPS, shift=5.0)
    path = lambda n: cameras.load_cameras(f"wl*{n - 1}").to(device)
    rows, numbers = [], {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # 1. our forward vs diffusers' (same config, pure dtype, no PRoPE), 3 and 21 frames
    ours = M.DiT(base).to(device, dtype).eval()
    ref = WanTransformer3DModel(patch_size=base.patch_size, num_attention_heads=base.num_heads,
                                attention_head_dim=base.head_dim, in_channels=base.in_channels,
                                out_channels=base.out_channels, text_dim=base.text_dim, freq_dim=base.freq_dim,
                                ffn_dim=base.ffn_dim, num_layers=base.num_layers).to(device, dtype).eval()
    for n, key in ((cfg.chunk, "dit_vs_diffusers_3f"), (cfg.clip_frames, "dit_vs_diffusers_21f")):
        x, t = torch.randn(1, base.out_channels, n, h, w, device=device, dtype=dtype), torch.full((1,), 500.0, device=device)
        with torch.no_grad():
            t_ours = timed(lambda: ours(x, t, text), cfg.repeats, device)
            t_ref = timed(lambda: ref(x, t, text, return_dict=False), cfg.repeats, device)
        numbers[key] = t_ours / t_ref
        rows.append((f"forward, {n} latent frames, ours", t_ours, f"x{t_ours / t_ref:.2f} of diffusers"))
        rows.append((f"forward, {n} latent frames, diffusers", t_ref, ""))
    ours = ref = None  # free the memory before the next model

    # 2. streaming with the PRoPE branch: the first chunk (empty cache) and a steady one (sink 1 + window full)
    net = M.DiT(M.make_config(cfg.preset, prope="branch", chunk=cfg.chunk, **small)).to(device, dtype).eval()
    for blk in net.blocks:  # a trained branch is not zero; make its attention count
        torch.nn.init.normal_(blk.self_attn.prope_proj.weight, std=1e-3)
    cams = path(1 + cfg.window + 2 * cfg.chunk)
    cache = net.new_cache(1, h, w, sink=1, window=cfg.window, device=device)
    noise = torch.randn(1, base.out_channels, cfg.chunk, h, w, device=device, dtype=torch.float32)
    first = lambda: (cache.reset(), M.generate_chunk(net, cache, noise, 0, text, cams.frames(0, cfg.chunk), None,
                                                     few, renoise=True))
    numbers["first_chunk_s"] = t_first = timed(first, cfg.repeats, device)
    cache.reset()
    with torch.no_grad():  # fill the sink and the window with committed frames
        for s in range(0, 1 + cfg.window, cfg.chunk):
            n = min(cfg.chunk, 1 + cfg.window - s)
            net(noise[:, :, :n], torch.zeros(1, device=device), text, cams.frames(s, s + n), cache=cache,
                frame_offset=s, commit=True)
    start = cache.frames_written
    steady = lambda: M.generate_chunk(net, cache, noise, start, text, cams.frames(start, start + cfg.chunk), None,
                                      few, renoise=True)
    numbers["steady_chunk_s"] = t_steady = timed(steady, cfg.repeats, device)
    video_frames = 4 * cfg.chunk  # a latent frame is 4 video frames
    numbers["fps_dit"] = video_frames / t_steady
    rows.append(("first chunk: 4 steps + commit, PRoPE branch, empty cache", t_first, ""))

    # the PRoPE branch as H more heads of the main SDPA call (model.SelfAttention, the concatenation of the
    # chunk's q, k, v included) vs two calls, one attention of a steady chunk over the full cache
    H, D, tpf = base.num_heads, base.head_dim, h * w
    q = torch.randn(1, 2 * H, cfg.chunk * tpf, D, device=device, dtype=dtype)  # (B, 2H, chunk tokens, D)
    k, v = (torch.randn(1, 2 * H, (1 + cfg.window + cfg.chunk) * tpf, D, device=device, dtype=dtype) for _ in "kv")
    sdpa, halves = torch.nn.functional.scaled_dot_product_attention, lambda t: (t[:, :H], t[:, H:])
    with torch.no_grad():
        t_two = timed(lambda: (sdpa(q[:, :H], k[:, :H], v[:, :H]), sdpa(q[:, H:], k[:, H:], v[:, H:])), cfg.repeats, device)
        t_one = timed(lambda: (torch.cat(halves(q), 1), torch.cat(halves(k[:, :, -q.shape[2]:]), 1),
                               torch.cat(halves(v[:, :, -q.shape[2]:]), 1), sdpa(q, k, v)), cfg.repeats, device)
    numbers["branch_one_call_vs_two"] = t_one / t_two
    rows.append(("PRoPE branch attention, one call of 2H heads", t_one, f"x{t_one / t_two:.2f} of two calls"))
    rows.append(("PRoPE branch attention, two calls of H heads", t_two, ""))
    rows.append((f"steady chunk: sink 1 + window {cfg.window}", t_steady, f"{numbers['fps_dit']:.1f} frames/s DiT only"))

    # 3. the streaming VAE decode of a chunk (Wan2.1's VAE architecture; tiny with --quick)
    vae = AutoencoderKLWan(**(dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1) if cfg.quick else {}))
    stream = data.WanVAECodec(vae.to(device, dtype).eval()).stream()
    stream.decode(noise[:, :, :1])  # frame 0 decodes alone; from then on chunks decode in steady state
    t_vae = timed(lambda: stream.decode(noise), cfg.repeats, device)
    numbers["fps_with_vae"] = video_frames / (t_steady + t_vae)
    rows.append(("streaming VAE decode of a chunk", t_vae, f"{numbers['fps_with_vae']:.1f} frames/s with the decode"))

    # 4. the bidirectional teacher: 50 steps with CFG = 100 forwards over the clip
    clip_cams = path(cfg.clip_frames)
    x = torch.randn(1, base.out_channels, cfg.clip_frames, h, w, device=device, dtype=dtype)
    with torch.no_grad():
        t_fwd = timed(lambda: net(x, torch.full((1,), 500.0, device=device), text, clip_cams), cfg.repeats, device)
    numbers["bidir_50step_cfg_s"] = 100 * t_fwd
    numbers["first_frame_latency_ratio"] = 100 * t_fwd / t_first
    rows.append((f"bidirectional 50 steps + CFG, {cfg.clip_frames} frames (100 x one forward)", 100 * t_fwd,
                 f"first-frame latency x{100 * t_fwd / t_first:.0f} lower with AR"))

    # 5. teacher forcing over the clip (flex BlockMask on CUDA), and a Stage 1 training step
    t_tf = torch.rand(1, cfg.clip_frames, device=device) * 1000
    with torch.no_grad():
        numbers["tf_forward_s"] = timed(lambda: net(x, t_tf, text, clip_cams, clean=x), cfg.repeats, device)
    rows.append((f"teacher-forcing forward, {cfg.clip_frames} + {cfg.clip_frames} frames", numbers["tf_forward_s"], ""))
    net = cache = None
    trainee = M.DiT(M.make_config(cfg.preset, prope="branch", chunk=cfg.chunk, **small)).to(device)  # fp32 weights
    trainee.grad_ckpt = True
    opt = torch.optim.AdamW(trainee.parameters(), lr=1e-5)
    x32, text32 = x.float(), text.float()

    def train_step():
        with common.autocast(device):
            loss = M.flow_matching_loss(trainee, x32, torch.randn_like(x32), t_tf / 1000, text32, clip_cams, None,
                                        clean=x32)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    numbers["train_step_s"] = timed(train_step, max(1, cfg.repeats // 2), device)
    numbers["train_step_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rows.append((f"Stage 1 training step, {cfg.clip_frames} frames, activation checkpointing", numbers["train_step_s"],
                 f"peak {numbers['train_step_peak_gib']:.1f} GiB" if numbers["train_step_peak_gib"] else "peak: CUDA only"))
    sync()
    return rows, numbers


def bench_tiny(cfg, device):
    """The embedded world's tiny model: returns table rows (name, seconds, note) and the numbers."""
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
    many = M.euler_sigmas(25)

    def first_chunk_25():  # the AR model before distillation: 25 Euler steps per chunk
        cache = ar.new_cache(1, h, w, device=device)
        M.generate_chunk(ar, cache, noise[:, :, :ar.cfg.chunk], 0, t1, c1.frames(0, ar.cfg.chunk),
                         cond1[:, :, :ar.cfg.chunk], many)
    t_ar25 = timed(first_chunk_25, max(1, cfg.repeats // 2), device)
    t_bi = timed(lambda: M.sample_bidir(bidir, noise, t1, c1, cond1, M.euler_sigmas(50)), max(1, cfg.repeats // 2), device)
    rows.append(("first chunk, 4-step AR + KV cache", t_ar, ""))
    rows.append(("first chunk, 25-step AR + KV cache", t_ar25, f"x{t_ar25 / t_ar:.1f} of 4 steps"))
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

    # 5. an empty cache costs what it holds, not what it could hold
    def first_chunk_window(window):
        cache = ar.new_cache(1, h, w, window=window, device=device)
        return lambda: (cache.reset(), M.generate_chunk(ar, cache, noise[:, :, :ar.cfg.chunk], 0, t1,
                                                        c1.frames(0, ar.cfg.chunk), cond1[:, :, :ar.cfg.chunk], few, renoise=True))
    t_w8, t_w256 = (timed(first_chunk_window(n), cfg.repeats, device) for n in (8, 256))
    rows.append(("first chunk, window 8", t_w8, ""))
    rows.append(("first chunk, window 256", t_w256, f"x{t_w256 / t_w8:.2f} of window 8"))
    numbers = dict(first_chunk_s=t_ar, ar_25step_first_chunk_s=t_ar25, bidir_50step_s=t_bi, first_frame_latency_ratio=t_bi / t_ar,
                   cache_vs_recompute=t_full / t_cache, window_256_vs_8=t_w256 / t_w8)
    return rows, numbers


def main():
    cfg = common.parse_config(Config, quick=dict(repeats=2, long_frames=16))
    device = common.device_of(cfg.device)
    if cfg.preset not in ("tiny", "wan2.1-t2v-1.3b"):
        common.die(f"--preset={cfg.preset}: bench.py measures tiny or wan2.1-t2v-1.3b")
    if cfg.repeats < 1 or cfg.batch_size < 1 or cfg.frames < 2 or cfg.long_frames < 4:
        common.die("--repeats and --batch_size must be >= 1, --frames >= 2, --long_frames >= 4")
    rows, numbers = (bench_tiny if cfg.preset == "tiny" else bench_scale)(cfg, device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {cfg.preset}")
    print("| measurement | time | ratio |\n| --- | --- | --- |")
    for name, t, note in rows:
        print(f"| {name} | {t * 1000:.1f} ms | {note} |")
    if cfg.json:
        print(json.dumps({"preset": cfg.preset, "device": str(device), "quick": cfg.quick, **numbers}))


if __name__ == "__main__":
    main()
