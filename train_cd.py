"""Stage 2b: causal consistency distillation (paper §2.2, Stage 2b; Causal Forcing++) — no stored pairs.

Noise the ground truth to x_t at a point σ of a fine grid, take ONE teacher Euler step to x_t' at the
next grid point σ', and pull the student's x0 at (x_t, σ) towards the EMA student's x0 at (x_t', σ')
(the consistency target; at σ' = 0 it is x_t' itself). Everything under teacher forcing: each chunk
has its own σ and sees the clean ground-truth chunks before it. The student samples in the few steps
[1000, 750, 500, 250] (warped by the shift), predicting x0 and re-noising in between.

    python train_cd.py --ckpt=out/ar           # tiny model (CPU)
    python train_cd.py --ckpt=out/ar --quick
"""
import copy
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import model as M


@dataclass
class Config(common.StageConfig):
    ckpt: str = "out/ar"  # the Stage 1 AR teacher (also the student's initialization)
    name: str = "cd"
    grid: int = 48  # fine σ grid of the consistency steps (shifted schedule)
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)  # the student's few-step sampler
    guidance: float = 1.0  # teacher CFG for the ODE step; 1.0: toy captions restate frame 0
    max_steps: int = 300
    ema: float = 0.95  # the target network's decay (LCM / Causal Forcing++ use ~0.95)
    seed: int = 3


QUICK = {**common.QUICK, "grid": 8}


def x0_of(net, x_t, sigma, text, cams, cond, x0_ctx):
    """The consistency function f(x_t, σ) = x_t - σ v(x_t, σ); σ (B, F), ground-truth context x0_ctx."""
    return x_t - sigma[:, None, :, None, None] * net(x_t, 1000 * sigma, text, cams, cond, clean=x0_ctx)


@torch.no_grad()
def cd_target(teacher, target_net, x_t, sigma, sigma_next, text, cams, cond, x0_ctx, guidance=1.0):
    """One teacher Euler step x_t -> x_t' (σ -> σ'), then the EMA student's x0 at (x_t', σ')."""
    v = M.guided_velocity(teacher, x_t, 1000 * sigma, text, cams, cond, clean=x0_ctx, guidance=guidance)
    x_next = x_t + (sigma_next - sigma)[:, None, :, None, None] * v
    return x0_of(target_net, x_next, sigma_next, text, cams, cond, x0_ctx)


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg, cfg.name)
    teacher = common.or_die(M.load_pretrained, cfg.ckpt).to(device).eval()
    common.requires_grad(teacher, False)
    chunk = teacher.cfg.chunk
    codec, source = data.training_source(cfg, teacher.cfg)
    net = copy.deepcopy(teacher).train()
    common.requires_grad(net, True)
    ema = copy.deepcopy(net).eval()
    common.requires_grad(ema, False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    step = common.resume(stem, net, ema, opt, rank) if cfg.resume else 0
    model = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else net
    grid = torch.tensor(M.euler_sigmas(cfg.grid, cfg.shift), device=device)  # (grid + 1,) from 1 to 0
    few = M.few_step_sigmas(cfg.timesteps, cfg.shift)
    clips = data.eval_clips(cfg.eval_clips, cfg.frames, cfg.height, cfg.width, net.cfg.text_dim, cfg.text_len) \
        if rank == 0 and not cfg.data else None

    def report(step, net_eval, name, renoise=True):
        m = data.evaluate(*M.metric_fns(net_eval, "ar", few, renoise=renoise), codec, clips,
                          os.path.join(cfg.out_dir, f"{name}_sample.gif"), device)
        common.log(f"step {step} {name}: {data.format_metric(m)}")
        common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, model=name, eval=m))

    common.log(f"{cfg.name}: student and target from {cfg.ckpt}, grid {cfg.grid}, target EMA {cfg.ema}")
    if clips is not None and step == 0:
        # the baselines a student must beat: the teacher at the same 4 steps, with the students'
        # sampler (x0, then fresh noise) and with its own PF-ODE (Euler); both blur, see sharpness
        report(0, teacher, "teacher_4step")
        report(0, teacher, "teacher_4step_euler", renoise=False)
    bar = common.progress(cfg.max_steps, initial=step, desc=cfg.name)
    t0 = time.time()
    while step < cfg.max_steps:
        lr = common.lr_at(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        b = source(step, rank, world, device)
        x0 = b["x0"]
        cond = M.image_cond(x0[:, :, 0], x0.shape[2])
        i = (b["u"][:, ::chunk] * cfg.grid).long().clamp(max=cfg.grid - 1).repeat_interleave(chunk, 1)  # (B, F)
        sigma, sigma_next = grid[i], grid[i + 1]
        x_t = M.add_noise(x0, b["noise"], sigma[:, None, :, None, None])
        target = cd_target(teacher, ema, x_t, sigma, sigma_next, b["text"], b["cameras"], cond, x0, cfg.guidance)
        with common.autocast(device):
            loss = F.mse_loss(x0_of(model, x_t, sigma, b["text"], b["cameras"], cond, x0).float(), target.float())
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
            bar.set_postfix(loss=f"{lv:.5f}", lr=f"{lr:.1e}", gnorm=f"{gnorm:.2f}")
            common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, loss=lv, lr=lr, time=time.time() - t0))
        if step % cfg.save_every == 0 or done:
            common.save_checkpoint(stem, net, config=cfg, stage="cd", step=step, parent=cfg.ckpt,
                                   model_config=net.cfg, ema_state=ema, optimizer=opt)
        if clips is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            report(step, ema, cfg.name)
        if done:
            break
    bar.close()
    common.cleanup_ddp()


if __name__ == "__main__":
    main()
