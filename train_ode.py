"""Stage 2a: causal ODE distillation (paper §2.2, Stage 2a) — the AR teacher's PF-ODE -> a few-step student.

(i) Pairs. For every training clip the AR teacher integrates the probability-flow ODE of each chunk
    (Euler, `ode_steps` steps on the shifted schedule) given the ground-truth prefix — under teacher
    forcing all chunks integrate at once, each seeing the clean chunks before it. Only the states at
    the few-step σ's, the ODE end point and the clean ground truth are kept (fp16 safetensors shards,
    written atomically; an interrupted generation resumes at the first missing shard).
(ii) Student. Initialized from the teacher; each chunk gets one of the few-step states, and the student's
    x0 = x_t - σ v must match the ODE end point (regression), with the ground-truth prefix as context.

    python train_ode.py --ckpt=out/ar          # tiny model (CPU): pairs + training
    python train_ode.py --ckpt=out/ar --quick
"""
import copy
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import common
import data
import metric
import model as M
import prope


@dataclass
class Config(common.StageConfig):
    ckpt: str = "out/ar"  # the Stage 1 AR teacher
    name: str = "ode"
    pairs_dir: str = ""  # where the ODE pairs go ("" = OUT_DIR/ode_pairs)
    pairs: int = 192  # clips of ODE data
    ode_steps: int = 48  # Euler steps of the teacher's PF-ODE (a multiple of the few-step count)
    timesteps: tuple[int, ...] = M.FEW_STEP_TIMESTEPS  # the student's few steps, warped through the shift
    guidance: float = 1.0  # teacher CFG; 1.0: the toy captions only restate what frame 0 shows
    max_steps: int = 400
    eval_every: int = 100
    save_every: int = 100
    seed: int = 2


QUICK = {**common.QUICK, "pairs": 4, "ode_steps": 8}
PAIR_BATCH_OFFSET = 10**6  # pair clips are batches this far above any training step: clips no stage trains on


@torch.no_grad()
def ode_pairs(teacher, b, sigmas, keep, guidance):
    """Integrate the teacher's PF-ODE from b["noise"] for all chunks at once, ground-truth prefix as context.

    sigmas: the Euler grid (1 -> 0); keep: its indices at the few-step σ's. Returns
    states (B, K, C, F, h, w) at those σ's and the end point (B, C, F, h, w).
    """
    x0, x = b["x0"], b["noise"]
    cond = M.image_cond(x0[:, :, 0], x0.shape[2])
    states = []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if i in keep:
            states.append(x)
        t = torch.full(x.shape[:1] + x.shape[2:3], 1000.0 * s, device=x.device)  # (B, F)
        v = M.guided_velocity(teacher, x, t, b["text"], b["cameras"], cond, clean=x0, guidance=guidance)
        x = x + (s_next - s) * v
    return torch.stack(states, 1), x


def generate(cfg, teacher, source, pairs_dir, rank, world, device):
    """(i): write pairs_dir/shard_NNNNN.safetensors (one training batch each) + index.json; resumable."""
    os.makedirs(pairs_dir, exist_ok=True)
    sigmas = M.euler_sigmas(cfg.ode_steps, cfg.shift)
    levels = M.few_step_sigmas(cfg.timesteps, cfg.shift)[:-1]  # the few-step σ's, without the final 0
    keep = [min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - s)) for s in levels]
    if max(abs(sigmas[i] - s) for i, s in zip(keep, levels)) > 1e-6:
        common.die(f"--ode_steps={cfg.ode_steps} does not put grid points on the few-step σ's {levels}")
    shards = -(-cfg.pairs // cfg.batch_size)
    index = dict(shards=shards, batch=cfg.batch_size, sigmas=levels, ode_steps=cfg.ode_steps, teacher=cfg.ckpt,
                 frames=cfg.frames, height=cfg.height, width=cfg.width, seed=cfg.seed)
    index_path = os.path.join(pairs_dir, "index.json")
    if os.path.exists(index_path):
        old = json.load(open(index_path))
        if {k: v for k, v in old.items() if k != "shards"} != {k: v for k, v in index.items() if k != "shards"}:
            common.die(f"{index_path} was made with other settings ({old}); delete {pairs_dir} or pass --pairs_dir")
    if rank == 0:  # written first, so a resumed generation is checked against the settings it began with
        with open(index_path + ".tmp", "w") as f:
            json.dump(index, f, indent=1)
        os.replace(index_path + ".tmp", index_path)
    for k in common.progress(range(rank, shards, world), desc="ode pairs"):
        path = os.path.join(pairs_dir, f"shard_{k:05d}.safetensors")
        if os.path.exists(path):
            continue  # resume
        b = source(PAIR_BATCH_OFFSET + k, 0, 1, device)
        states, end = ode_pairs(teacher, b, sigmas, keep, cfg.guidance)
        tensors = dict(states=states.half(), ode_x0=end.half(), x0=b["x0"].half(), text=b["text"].half(),
                       w2c=b["cameras"].w2c.float(), K=b["cameras"].K.float())
        tensors = {n: t.contiguous().cpu() for n, t in tensors.items()}
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        if k == 0:
            per = sum(t.numel() * t.element_size() for t in tensors.values()) / states.shape[0]
            common.log(f"ode pairs: {per / 1024:.1f} KiB per sample, {shards} shards of {cfg.batch_size}")
    return levels, shards


def load_pairs(pairs_dir, shards):
    """All shards back as one dict of tensors (the toy data set fits in memory)."""
    parts = []
    for k in range(shards):
        path = os.path.join(pairs_dir, f"shard_{k:05d}.safetensors")
        try:
            parts.append(load_file(path))
        except Exception as e:
            common.die(f"{path}: unreadable ODE pair shard ({str(e).splitlines()[0]}); delete it and rerun to regenerate")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def ode_loss(model, x_t, sigma, x_ode, x0, text, cams, ctx=None, ctx_t=None):
    """Stage 2a loss: || (x_t - σ v(x_t)) - x_ode ||², per-chunk σ from the few-step list, GT prefix as context
    (noised as the teacher's config says: ctx, ctx_t from model.noisy_context)."""
    s = sigma[:, None, :, None, None]
    cond = M.image_cond(x0[:, :, 0], x0.shape[2])
    v = model(x_t, 1000 * sigma, text, cams, cond, clean=x0 if ctx is None else ctx, clean_t=ctx_t)
    return F.mse_loss((x_t - s * v).float(), x_ode.float())


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg)
    teacher = common.frozen(common.or_die(M.load_pretrained, cfg.ckpt, model_config=cfg.model_config).to(device))
    codec, source = data.training_source(cfg, teacher.cfg)
    pairs_dir = cfg.pairs_dir or os.path.join(cfg.out_dir, "ode_pairs")
    t0 = time.time()
    levels, shards = generate(cfg, teacher, source, pairs_dir, rank, world, device)
    if world > 1:
        torch.distributed.barrier()
    pairs = load_pairs(pairs_dir, shards)
    n = pairs["x0"].shape[0]
    common.log(f"ode pairs: {n} clips in {pairs_dir} ({time.time() - t0:.0f} s)")

    net = copy.deepcopy(teacher).train()  # the student starts as the teacher
    common.requires_grad(net, True)
    ema, opt, first_step, model = common.setup_training(cfg, net, stem, rank, world, local_rank, device)
    clips = metric.stage_clips(cfg, net.cfg, rank)
    few = levels + [0.0]  # the student's sampler: the few-step levels, then 0
    saves = [dict(stem=stem, state_dict=net, ema_state=ema, optimizer=opt, stage="ode", parent=cfg.ckpt,
                  model_config=net.cfg)]

    if first_step == 0:
        metric.report_teacher_baselines(cfg, clips, codec, teacher, few, device)
    bar = common.progress(cfg.max_steps, initial=first_step, desc=cfg.name)
    B, chunk = cfg.batch_size // world, net.cfg.chunk
    for step in range(first_step, common.last_step(cfg)):
        lr = common.set_lr(opt, cfg, step)
        rng = torch.Generator().manual_seed(common.mix_seed(cfg.seed, step))  # the same draw on every rank
        idx = torch.randint(n, (cfg.batch_size,), generator=rng)[rank * B:(rank + 1) * B]
        level = torch.randint(len(levels), (cfg.batch_size, cfg.frames // chunk), generator=rng)[rank * B:(rank + 1) * B]
        level = level.repeat_interleave(chunk, 1)  # (B, F): one few-step state per chunk
        p = {k: v[idx].to(device) for k, v in pairs.items()}
        states = p["states"].float().permute(0, 3, 1, 2, 4, 5)  # (B, F, K, C, h, w)
        x_t = states[torch.arange(B)[:, None], torch.arange(cfg.frames)[None], level].permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        sigma = torch.tensor(levels, device=device)[level.to(device)]  # (B, F)
        cams = prope.Cameras(p["w2c"], p["K"])
        u_ctx = torch.rand(cfg.batch_size, cfg.frames, generator=rng)[rank * B:(rank + 1) * B].to(device)
        eps_ctx = torch.randn((cfg.batch_size, *p["x0"].shape[1:]), generator=rng)[rank * B:(rank + 1) * B].to(device)
        ctx, ctx_t = M.noisy_context(p["x0"].float(), u_ctx, eps_ctx, net.cfg, chunk)  # as the teacher learned
        with common.autocast(device):
            loss = ode_loss(model, x_t, sigma, p["ode_x0"], p["x0"].float(), p["text"].float(), cams, ctx, ctx_t)
        gnorm = common.optimizer_step(loss, opt, model, cfg, step, ema)
        if common.end_of_step(cfg, step + 1, bar, t0, dict(loss=loss, lr=lr, gnorm=gnorm), saves):
            metric.report(cfg, clips, codec, step + 1, ema, "ar", few, renoise=True, device=device)


if __name__ == "__main__":
    main()
