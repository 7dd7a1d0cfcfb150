"""Stage 3: asymmetric DMD with self-rollout (paper §2.3; DMD2 / Self-Forcing lineage).

The few-step AR student (from Stage 2a or 2b) rolls out whole clips by itself through its KV cache,
chunk by chunk. One exit step k is drawn per iteration and shared by all chunks: steps before k and
the cache refresh run without gradient, so the gradient flows only through each chunk's exit-step
forward. The student's clip is scored by two bidirectional camera-conditioned models:
  real score  the frozen Phase 1 teacher (optionally with classifier-free guidance),
  fake score  a critic initialized from the same teacher and trained online by flow matching on the
              student's own samples (`critic_steps` updates per generator update).
The DMD gradient (x0_fake - x0_real) / mean|x_g - x0_real| pushes the student's distribution towards
the teacher's - matching a distribution rather than regressing to a blurry mean.

    python train_dmd.py --ckpt=out/ode --teacher=out/bidir
    python train_dmd.py --ckpt=out/cd --teacher=out/bidir --quick
"""
import copy
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import data
import model as M


@dataclass
class Config(common.StageConfig):
    ckpt: str = "out/ode"  # the few-step student (Stage 2a or 2b)
    teacher: str = "out/bidir"  # real score (frozen) and the fake score's initialization
    name: str = "dmd"
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    guidance: float = 1.0  # real-score CFG (3.0 at Wan scale; the toy captions restate frame 0)
    critic_steps: int = 5  # fake-score updates per generator update
    sigma_min: float = 0.02  # range of the noise level at which both scores are queried
    sigma_max: float = 0.98
    max_steps: int = 200  # generator steps
    lr: float = 3e-5  # generator (2e-6 at scale; the tiny model moves too little at 1e-5 in 200 steps)
    critic_lr: float = 6e-5  # fake score: twice the generator's, so the critic keeps up
    eval_every: int = 100
    save_every: int = 50
    seed: int = 4


QUICK = {**common.QUICK, "max_steps": 3, "critic_steps": 2, "eval_every": 3, "save_every": 2}


def self_rollout(gen, noise, text, cams, first, sigmas, exit_step, generator=None):
    """The student generates the clip chunk by chunk; gradient only through each chunk's exit step.

    sigmas: the few-step list with a final 0; exit_step in [0, len(sigmas) - 1). Returns the x0
    predictions (B, C, F, h, w) of every chunk's exit step (carrying gradient).
    """
    B, C, F_, H, W = noise.shape
    chunk = gen.cfg.chunk
    cache = gen.new_cache(B, H, W, window=F_, device=noise.device, dtype=noise.dtype)
    out = []
    for start in range(0, F_, chunk):
        stop = min(start + chunk, F_)
        c_cams, cond = cams.frames(start, stop), M.image_cond(first, stop - start, start)
        x = noise[:, :, start:stop]
        with torch.no_grad():  # the steps before the exit: few-step sampling, no gradient
            for s, s_next in zip(sigmas[:exit_step], sigmas[1:exit_step + 1]):
                v = gen(x, M._t(s, B, x.device), text, c_cams, cond, cache=cache, frame_offset=start)
                x = M.add_noise(x - s * v, torch.randn(x.shape, generator=generator, device=x.device), s_next)
        s = sigmas[exit_step]
        x0 = x - s * gen(x, M._t(s, B, x.device), text, c_cams, cond, cache=cache, frame_offset=start)
        with torch.no_grad():  # cache refresh with the clean chunk, no gradient
            gen(x0.detach(), M._t(0.0, B, x.device), text, c_cams, cond, cache=cache, commit=True, frame_offset=start)
        out.append(x0)
    return torch.cat(out, 2)


def dmd_loss(x_g, real, fake, text, cams, cond, sigma, noise, guidance=1.0):
    """Stage 3 generator loss: 0.5 || x_g - sg(x_g - grad) ||² has gradient ∝ grad w.r.t. x_g, with

    grad = (x0_fake - x0_real) / mean|x_g - x0_real|  (per sample; DMD's normalized score difference)
    where both scores see x_t = (1 - σ) x_g + σ ε. sigma: (B,).
    """
    s = sigma.view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        x_t = M.add_noise(x_g, noise, s)
        x0_real = x_t - s * M.guided_velocity(real, x_t, 1000 * sigma, text, cams, cond, guidance=guidance)
        x0_fake = x_t - s * fake(x_t, 1000 * sigma, text, cams, cond)
        norm = (x_g - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x_g.float(), (x_g - grad).detach().float())


def critic_loss(fake, x_s, noise, sigma, text, cams, cond):
    """The fake score learns the student's distribution by flow matching on its samples x_s."""
    s = sigma.view(-1, 1, 1, 1, 1)
    v = fake(M.add_noise(x_s, noise, s), 1000 * sigma, text, cams, cond)
    return F.mse_loss(v.float(), (noise - x_s).float())


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg, cfg.name)
    gen = common.or_die(M.load_pretrained, cfg.ckpt).to(device).train()
    real = common.or_die(M.load_pretrained, cfg.teacher).to(device).eval()
    common.requires_grad(real, False)
    if real.cfg.out_channels != gen.cfg.out_channels or real.cfg.prope != gen.cfg.prope:
        common.die(f"--teacher {cfg.teacher} and --ckpt {cfg.ckpt} are different architectures")
    fake = copy.deepcopy(real).train()
    common.requires_grad(fake, True)
    ema = copy.deepcopy(gen).eval()
    common.requires_grad(ema, False)
    # Adam with beta1 = 0: the two players' gradients change fast, momentum makes the game unstable
    opt_g = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, betas=(0.0, 0.999), weight_decay=0.0)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=cfg.critic_lr, betas=(0.0, 0.999), weight_decay=0.0)
    opts = {"generator": opt_g, "critic": opt_f}
    step = 0
    if cfg.resume:
        step = common.resume(stem, gen, ema, opts, rank)
        critic_stem = stem + "_critic"
        if os.path.exists(critic_stem + ".json"):
            fake.load_state_dict(common.or_die(common.load_checkpoint, critic_stem, load_opt=False)["state"])
    codec, source = data.training_source(cfg, gen.cfg)
    few = M.few_step_sigmas(cfg.timesteps, cfg.shift)
    clips = data.eval_clips(cfg.eval_clips, cfg.frames, cfg.height, cfg.width, gen.cfg.text_dim, cfg.text_len) \
        if rank == 0 and not cfg.data else None

    def report(step, net_eval, name):
        m = data.evaluate(*M.metric_fns(net_eval, "ar", few, renoise=True), codec, clips,
                          os.path.join(cfg.out_dir, f"{name}_sample.gif"), device)
        common.log(f"step {step} {name}: {data.format_metric(m)}")
        common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, model=name, eval=m))

    common.log(f"{cfg.name}: student {cfg.ckpt}, real/fake score {cfg.teacher}, {cfg.critic_steps} critic steps per step")
    if clips is not None and step == 0:
        report(0, ema, "student")
    bar = common.progress(cfg.max_steps, initial=step, desc=cfg.name)
    t0 = time.time()
    loss_f = torch.zeros((), device=device)  # stays 0 with --critic_steps=0 (a frozen fake score)
    while step < cfg.max_steps:
        for j in range(cfg.critic_steps + 1):
            b = source(step * (cfg.critic_steps + 1) + j, rank, world, device)
            x0, text, cams = b["x0"], b["text"], b["cameras"]
            first, cond = x0[:, :, 0], M.image_cond(x0[:, :, 0], x0.shape[2])
            seed = cfg.seed * 1_000_003 + step * 97 + j * 7 + rank
            g = torch.Generator(device).manual_seed(seed)
            noise_roll = torch.randn(x0.shape, generator=g, device=device)
            sigma = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * b["u"][:, 0]  # (B,)
            if j < cfg.critic_steps:  # critic: flow matching on fresh student samples
                with torch.no_grad():
                    x_s = M.sample_ar(gen, noise_roll, text, cams, M.image_cond(first, x0.shape[2]), few,
                                      renoise=True, window=x0.shape[2], generator=g)
                loss_f = critic_loss(fake, x_s, b["noise"], sigma, text, cams, cond)
                opt_f.zero_grad(set_to_none=True)
                loss_f.backward()
                common.all_reduce_grads(fake)
                torch.nn.utils.clip_grad_norm_(fake.parameters(), cfg.grad_clip)
                opt_f.step()
            else:  # generator: self-rollout with one shared exit step, DMD gradient
                exit_step = int(torch.randint(len(few) - 1, (), generator=torch.Generator().manual_seed(seed)))
                x_g = self_rollout(gen, noise_roll, text, cams, first, few, exit_step, generator=g)
                loss_g = dmd_loss(x_g, real, fake, text, cams, cond, sigma, b["noise"], cfg.guidance)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                common.all_reduce_grads(gen)
                gnorm = torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
                opt_g.step()
        common.update_ema(ema, gen, cfg.ema)
        step += 1
        bar.update(1)
        done = step == cfg.max_steps or step == cfg.stop_after
        lf = common.check_finite(common.all_reduce_mean(loss_f.detach()), step, stem + ".safetensors")
        lg = common.check_finite(common.all_reduce_mean(loss_g.detach()), step, stem + ".safetensors")
        bar.set_postfix(critic=f"{lf:.4f}", dmd=f"{lg:.5f}", gnorm=f"{gnorm:.2f}")
        common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, critic=lf, dmd=lg, exit=exit_step, time=time.time() - t0))
        if step % cfg.save_every == 0 or done:
            common.save_checkpoint(stem + "_critic", fake, config=cfg, stage="dmd_critic", step=step, parent=cfg.teacher,
                                   model_config=fake.cfg)
            common.save_checkpoint(stem, gen, config=cfg, stage="dmd", step=step, parent=cfg.ckpt,
                                   model_config=gen.cfg, ema_state=ema, optimizer=opts)
        if clips is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            report(step, ema, cfg.name)
        if done:
            break
    bar.close()
    common.cleanup_ddp()


if __name__ == "__main__":
    main()
