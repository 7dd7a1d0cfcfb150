"""Stage 1: autoregressive diffusion by teacher forcing (paper §2.2, Stage 1).

The bidirectional camera-controlled model becomes causal. Each training sequence is
[clean clip | noisy clip] under the block-causal mask (model.teacher_forcing_mask): a noisy chunk sees
the clean chunks before it and itself, every chunk has its own σ, and both halves share positions,
cameras and the first-frame condition. At inference the clean half is the KV cache (model.sample_ar).

    python train_ar.py --ckpt=out/bidir            # tiny model (CPU, ~30 min)
    python train_ar.py --ckpt=assets/bidir --quick
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
    ckpt: str = "out/bidir"  # the Phase 1 checkpoint
    name: str = "ar"
    chunk: int = 2  # latent frames per AR chunk (4 at Wan scale)
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 50
    ema: float = 0.995
    text_drop: float = 0.1  # caption dropout keeps the unconditional branch alive for CFG
    sample_steps: int = 25
    seed: int = 1


QUICK = {**common.QUICK, "sample_steps": 3}


def tf_loss(model, x0, noise, sigma, text, cams, cond):
    """Stage 1 loss: flow matching on the noisy half of [x0 | x_t] under the block-causal mask.

    sigma: (B, F), constant within each chunk, independent across chunks (Diffusion-Forcing style).
    """
    s = sigma[:, None, :, None, None]  # (B, 1, F, 1, 1)
    v = model(M.add_noise(x0, noise, s), 1000 * sigma, text, cams, cond, clean=x0)
    return F.mse_loss(v.float(), (noise - x0).float())


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg, cfg.name)
    net = common.or_die(M.load_pretrained, cfg.ckpt, chunk=cfg.chunk).to(device)
    if cfg.frames % cfg.chunk:
        common.die(f"--frames={cfg.frames} is not a multiple of --chunk={cfg.chunk}")
    codec, source = data.training_source(cfg, net.cfg)
    ema = copy.deepcopy(net).eval()
    common.requires_grad(ema, False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    step = common.resume(stem, net, ema, opt, rank) if cfg.resume else 0
    model = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else net
    common.log(f"{cfg.name}: from {cfg.ckpt}, {net.num_params() / 1e6:.2f}M parameters, chunk {cfg.chunk}, {world} process(es)")

    clips = data.eval_clips(cfg.eval_clips, cfg.frames, cfg.height, cfg.width, net.cfg.text_dim, cfg.text_len) \
        if rank == 0 and not cfg.data else None
    sigmas = M.euler_sigmas(cfg.sample_steps, cfg.shift)

    def report(step, label=cfg.name):  # the shared control metric with the AR many-step sampler (KV cache)
        m = data.evaluate(*M.metric_fns(ema, "ar", sigmas), codec, clips,
                          os.path.join(cfg.out_dir, f"{label}_sample.gif"), device)  # generated | truth
        common.log(f"step {step} {label}: {data.format_metric(m)}")
        common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, model=label, eval=m))

    if clips is not None and step == 0:
        report(0, "bidir_as_ar")  # the bidirectional weights used autoregressively, before Stage 1
    bar = common.progress(cfg.max_steps, initial=step, desc=cfg.name)
    t0 = time.time()
    while step < cfg.max_steps:
        lr = common.lr_at(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        b = source(step, rank, world, device)
        x0 = b["x0"]  # (B, C, F, h, w)
        cond = M.image_cond(x0[:, :, 0], x0.shape[2])
        u = b["u"][:, :: cfg.chunk].clamp(1e-4, 1 - 1e-4)  # one uniform per chunk
        sigma = M.shift_sigma(torch.sigmoid(torch.special.ndtri(u)), cfg.shift).repeat_interleave(cfg.chunk, 1)
        with common.autocast(device):
            loss = tf_loss(model, x0, b["noise"], sigma, b["text"], b["cameras"], cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        common.update_ema(ema, net, cfg.ema if step > cfg.warmup else 0.0)
        step += 1
        bar.update(1)
        done = step == cfg.max_steps or step == cfg.stop_after
        if step % 10 == 0 or step == cfg.max_steps:
            lv = common.check_finite(common.all_reduce_mean(loss.detach()), step, stem + ".safetensors")
            bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.1e}", gnorm=f"{gnorm:.2f}")
            common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, loss=lv, lr=lr, time=time.time() - t0))
        if step % cfg.save_every == 0 or done:
            common.save_checkpoint(stem, net, config=cfg, stage="ar", step=step, parent=cfg.ckpt,
                                   model_config=net.cfg, ema_state=ema, optimizer=opt)
        if clips is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            report(step)
        if done:
            break
    bar.close()
    common.cleanup_ddp()


if __name__ == "__main__":
    main()
