"""Phase 1: camera-controllable bidirectional fine-tuning (paper §2.1).

The DiT learns flow matching on whole clips, conditioned on text, the first frame (TI2V channel
concat) and the cameras (PRoPE). From base weights (`--init=PATH`, e.g. Wan2.1, which gets a
zero-initialized PRoPE branch so that step 0 equals the base model) or from scratch for the tiny
preset (inline PRoPE: projective and RoPE channels share one attention).

    python train_bidir.py                          # tiny model on the procedural world (CPU, ~45 min)
    python train_bidir.py --quick                  # smoke size
    torchrun --nproc_per_node=8 train_bidir.py --init=Wan2.1-T2V-1.3B/ --data=cache/ --preset=wan2.1-t2v-1.3b
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
    preset: str = "tiny"  # model preset (model.PRESETS)
    init: str = ""  # base weights for model.load_pretrained; "" = from scratch
    prope: str = "inline"  # inline (from scratch) | branch (fine-tuning a base) | none (camera-free base)
    name: str = "bidir"
    # batch 4: control emerges after a number of *updates*, so half the batch reaches it in ~half
    # the wall time (8k steps of batch 4 beat 10.4k of batch 8 here; README, Phase 1)
    batch_size: int = 4
    max_steps: int = 9000
    lr: float = 1e-3
    min_lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.0
    ema: float = 0.998
    text_drop: float = 0.1  # caption dropout, so classifier-free guidance is possible later
    sigma_mean: float = 0.7  # location of the logit-normal σ; > 0 trains more at high noise, where only the camera tells the motion
    eval_every: int = 3000
    sample_steps: int = 25
    save_every: int = 500


QUICK = {**common.QUICK, "sample_steps": 3}


def fm_loss(model, x0, noise, sigma, text, cams, cond):
    """Phase 1 loss (paper §2.1): flow matching on x_t = (1 - σ) x0 + σ ε, target v = ε - x0."""
    s = sigma.view(-1, 1, 1, 1, 1)
    v = model(M.add_noise(x0, noise, s), 1000 * sigma, text, cams, cond)
    return F.mse_loss(v.float(), (noise - x0).float())


def main():
    cfg = common.parse_config(Config, quick=QUICK)
    rank, local_rank, world, device, stem = common.start(cfg, cfg.name)

    # model: base weights + zero-init PRoPE branch, or from scratch
    if cfg.init:  # base weights (+ zero-init PRoPE branch, + zero-init image-condition channels)
        common.check_file(cfg.init, "--init checkpoint")
        branch = "branch" if cfg.prope == "inline" else cfg.prope  # inline PRoPE is for models trained from scratch
        net = M.enable_image_cond(common.or_die(M.load_pretrained, cfg.init, prope=branch))
    else:
        net = M.DiT(M.make_config(cfg.preset, prope=cfg.prope))
    net.to(device)
    codec, source = data.training_source(cfg, net.cfg)
    ema = copy.deepcopy(net).eval()
    common.requires_grad(ema, False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step = common.resume(stem, net, ema, opt, rank) if cfg.resume else 0
    model = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else net
    common.log(f"{cfg.name}: {net.num_params() / 1e6:.2f}M parameters, PRoPE {net.cfg.prope}, {world} process(es), {device}")

    clips = data.eval_clips(cfg.eval_clips, cfg.frames, cfg.height, cfg.width, net.cfg.text_dim, cfg.text_len) \
        if rank == 0 and not cfg.data else None
    sigmas = M.euler_sigmas(cfg.sample_steps, cfg.shift)

    bar = common.progress(cfg.max_steps, initial=step, desc=cfg.name)
    t0 = time.time()
    while step < cfg.max_steps:
        lr = common.lr_at(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        b = source(step, rank, world, device)  # this rank's share of the global batch of `step`
        cond = M.image_cond(b["x0"][:, :, 0], b["x0"].shape[2])
        u = b["u"][:, 0].clamp(1e-4, 1 - 1e-4)
        sigma = M.shift_sigma(torch.sigmoid(cfg.sigma_mean + torch.special.ndtri(u)), cfg.shift)  # logit-normal σ, shifted
        with common.autocast(device):
            loss = fm_loss(model, b["x0"], b["noise"], sigma, b["text"], b["cameras"], cond)
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
            common.save_checkpoint(stem, net, config=cfg, stage="bidir", step=step, parent=cfg.init or None,
                                   model_config=net.cfg, ema_state=ema, optimizer=opt)
        if clips is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            m = data.evaluate(*M.metric_fns(ema, "bidir", sigmas), codec, clips,
                              os.path.join(cfg.out_dir, f"{cfg.name}_sample.gif"), device)  # generated | truth
            common.log(f"step {step} ema: {data.format_metric(m)}")
            common.log_metrics(cfg.out_dir, cfg.name, dict(step=step, eval=m))
        if done:
            break
    bar.close()
    common.cleanup_ddp()


if __name__ == "__main__":
    main()
