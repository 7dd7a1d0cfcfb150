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
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import model as M
import prope


@dataclass
class Config(common.StageConfig):
    ckpt: str = "out/ar"  # the Stage 1 AR teacher
    name: str = "ode"
    pairs_dir: str = ""  # where the ODE pairs go ("" = OUT_DIR/ode_pairs)
    pairs: int = 192  # clips of ODE data
    ode_steps: int = 48  # Euler steps of the teacher's PF-ODE (a multiple of the few-step count)
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)  # the few-step list, warped through the shift
    guidance: float = 1.0  # teacher CFG; 1.0: the toy captions only restate what frame 0 shows
    max_steps: int = 400
    eval_every: int = 100
    save_every: int = 100
    seed: int = 2


QUICK = {**common.QUICK, "pairs": 4, "ode_steps": 8}


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
    few = M.few_step_sigmas(cfg.timesteps, cfg.shift)[:-1]
    keep = [min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - s)) for s in few]
    if max(abs(sigmas[i] - s) for i, s in zip(keep, few)) > 1e-6:
        common.die(f"--ode_steps={cfg.ode_steps} does not put grid points on the few-step σ's {few}")
    shards = -(-cfg.pairs // cfg.batch_size)
    index = dict(shards=shards, batch=cfg.batch_size, sigmas=few, ode_steps=cfg.ode_steps, teacher=cfg.ckpt,
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
        b = source(10**6 + k, 0, 1, device)  # batch indices far from training's, same generator
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
    return few, shards


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


def ode_loss(model, x_t, sigma, x_ode, x0, text, cams):
    """Stage 2a loss: || (x_t - σ v(x_t)) - x_ode ||², per-chunk σ from the few-step list, GT prefix as context."""
    s = sigma[:, None, :, None, None]
    cond = M.image_cond(x0[:, :, 0], x0.shape[2])
    v = model(x_t, 1000 * sigma, text, cams, cond, clean=x0)
    return F.mse_loss((x_t - s * v).float(), x_ode.float())


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg, cfg.name)
    teacher = common.or_die(M.load_pretrained, cfg.ckpt).to(device).eval()
    common.requires_grad(teacher, False)
    chunk = teacher.cfg.chunk
    codec, source = data.training_source(cfg, teacher.cfg)
    pairs_dir = cfg.pairs_dir or os.path.join(cfg.out_dir, "ode_pairs")
    t0 = time.time()
    few, shards = generate(cfg, teacher, source, pairs_dir, rank, world, device)
    if world > 1:
        torch.distributed.barrier()
    pairs = load_pairs(pairs_dir, shards)
    n = pairs["x0"].shape[0]
    common.log(f"ode pairs: {n} clips in {pairs_dir} ({time.time() - t0:.0f} s)")

    net = copy.deepcopy(teacher).train()  # the student starts as the teacher
    common.requires_grad(net, True)
    ema = copy.deepcopy(net).eval()
    common.requires_grad(ema, False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    step = common.resume(stem, net, ema, opt, rank) if cfg.resume else 0
    model = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else net
    clips = data.eval_clips(cfg.eval_clips, cfg.frames, cfg.height, cfg.width, net.cfg.text_dim, cfg.text_len) \
        if rank == 0 and not cfg.data else None
    few_sigmas = few + [0.0]

    def report(step, net_eval, name, renoise=True):
        m = data.evaluate(*M.metric_fns(net_eval, "ar", few_sigmas, renoise=renoise), codec, clips,
                          os.path.join(cfg.out_dir, f"{name}_sample.gif"), device)
        common.log(f"step {step} {name}: {data.format_metric(m)}")
        common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, model=name, eval=m))

    if clips is not None and step == 0:
        # the baselines a student must beat: the teacher at the same 4 steps, with the students'
        # sampler (x0, then fresh noise) and with its own PF-ODE (Euler); both blur, see sharpness
        report(0, teacher, "teacher_4step")
        report(0, teacher, "teacher_4step_euler", renoise=False)
    bar = common.progress(cfg.max_steps, initial=step, desc=cfg.name)
    B = cfg.batch_size // world
    while step < cfg.max_steps:
        lr = common.lr_at(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)  # same draw on every rank
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)[rank * B:(rank + 1) * B]
        level = torch.randint(len(few), (cfg.batch_size, cfg.frames // chunk), generator=gen)[rank * B:(rank + 1) * B]
        level = level.repeat_interleave(chunk, 1)  # (B, F): one few-step state per chunk
        p = {k: v[idx].to(device) for k, v in pairs.items()}
        states = p["states"].float().permute(0, 3, 1, 2, 4, 5)  # (B, F, K, C, h, w)
        x_t = states[torch.arange(B)[:, None], torch.arange(cfg.frames)[None], level].permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
        sigma = torch.tensor(few, device=device)[level.to(device)]  # (B, F)
        cams = prope.Cameras(p["w2c"], p["K"])
        with common.autocast(device):
            loss = ode_loss(model, x_t, sigma, p["ode_x0"], p["x0"].float(), p["text"].float(), cams)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        common.update_ema(ema, net, cfg.ema)
        step += 1
        bar.update(1)
        done = step == cfg.max_steps or step == cfg.stop_after
        if step % 10 == 0 or done:
            lv = common.check_finite(common.all_reduce_mean(loss.detach()), step, stem + ".safetensors")
            bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.1e}", gnorm=f"{gnorm:.2f}")
            common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, loss=lv, lr=lr, time=time.time() - t0))
        if step % cfg.save_every == 0 or done:
            common.save_checkpoint(stem, net, config=cfg, stage="ode", step=step, parent=cfg.ckpt,
                                   model_config=net.cfg, ema_state=ema, optimizer=opt)
        if clips is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            report(step, ema, cfg.name)
        if done:
            break
    bar.close()
    common.cleanup_ddp()


if __name__ == "__main__":
    main()
