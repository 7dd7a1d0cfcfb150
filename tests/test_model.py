"""model.py + prope.py: parity with diffusers, real shapes, PRoPE invariances, cache == teacher forcing, bad input."""
import json
import os

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

import model as M
import prope

REF = os.path.join(os.path.dirname(__file__), "reference")  # facts about the real checkpoints (README there)


def random_diffusers_wan(heads, head_dim, layers, seed=0):
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=40,
                                num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                eps=1e-6, rope_max_seq_len=64).eval()
    with torch.no_grad():  # default init leaves zeros and ones that would hide mistakes
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def random_cameras(B, F, gen=None, trans=0.5):
    """Random rigid w2c (B, F, 4, 4) and plausible normalized intrinsics (B, F, 4)."""
    A = torch.randn(B, F, 3, 3, generator=gen)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[..., None, :]
    Q = Q * torch.det(Q)[..., None, None]  # det +1
    w2c = torch.eye(4).repeat(B, F, 1, 1)
    w2c[..., :3, :3] = Q
    w2c[..., :3, 3] = trans * torch.randn(B, F, 3, generator=gen)
    K = torch.tensor([0.8, 0.9, 0.5, 0.45]) + 0.05 * torch.rand(B, F, 4, generator=gen)
    return prope.Cameras(w2c, K)


@pytest.mark.parametrize("heads,head_dim,layers", [(2, 12, 2), (3, 16, 1)])
def test_parity_with_diffusers_folder(tmp_path, heads, head_dim, layers):
    ref = random_diffusers_wan(heads, head_dim, layers)
    ref.save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path).eval()
    assert ours.cfg.num_heads == heads and ours.cfg.num_layers == layers
    x = torch.randn(2, 4, 3, 6, 10)  # non-square latents, batch 2
    ctx = torch.randn(2, 7, 16)
    t = torch.tensor([120.0, 830.0])  # per-sample timesteps
    with torch.no_grad():
        a = ref(x, t, ctx, return_dict=False)[0]
        b = ours(x, t, ctx)
        assert (a - b).abs().max() < 1e-4
        # per-frame timesteps: diffusers takes them per token
        tf = torch.tensor([[10.0, 500.0, 900.0], [3.0, 30.0, 300.0]])
        a = ref(x, tf.repeat_interleave(3 * 5, 1), ctx, return_dict=False)[0]
        b = ours(x, tf, ctx)
        assert (a - b).abs().max() < 1e-4
        assert (b - ours(x, t, ctx)).abs().max() > 1e-2  # the timestep matters


def test_original_layout_through_diffusers_converter(tmp_path):
    cfg = M.ModelConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, in_channels=4, out_channels=4,
                        text_dim=16, freq_dim=32, image_cond=False, prope="none")
    torch.manual_seed(1)
    ours = M.DiT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    conv = convert_wan_transformer_to_diffusers(dict(sd))
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2,
                                cross_attn_norm=True, eps=1e-6).eval()
    ref.load_state_dict(conv, strict=True)
    x, ctx, t = torch.randn(2, 4, 2, 4, 6), torch.randn(2, 3, 16), torch.tensor([5.0, 999.0])
    with torch.no_grad():
        assert (ref(x, t, ctx, return_dict=False)[0] - ours(x, t, ctx)).abs().max() < 1e-4
    # and the original-layout file loads back (head count from the Wan default head_dim = 128 is wrong
    # here, so it is given, as a user of a headless file would)
    save_file(sd, tmp_path / "wan.safetensors")
    back = M.load_pretrained(tmp_path / "wan.safetensors", num_heads=2).eval()
    with torch.no_grad():
        assert (back(x, t, ctx) - ours(x, t, ctx)).abs().max() == 0


def test_sharded_and_causvid_pt(tmp_path):
    ref = random_diffusers_wan(2, 12, 2)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))
    a = M.load_pretrained(tmp_path / "sharded").eval()
    sd = {"model." + k: v for k, v in a.state_dict().items()}
    torch.save({"generator_ema": sd, "generator": {k: v * 0 for k, v in sd.items()}}, tmp_path / "sf.pt")
    b = M.load_pretrained(tmp_path / "sf.pt", num_heads=2).eval()
    x, ctx, t = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 16), torch.tensor([400.0])
    with torch.no_grad():
        assert (a(x, t, ctx) - b(x, t, ctx)).abs().max() == 0
        assert (ref(x, t, ctx, return_dict=False)[0] - a(x, t, ctx)).abs().max() < 1e-4


def test_real_shapes_on_meta():
    shapes = json.load(open(os.path.join(REF, "wan2.1-t2v-1.3b.original-shapes.json")))
    with torch.device("meta"):
        net = M.DiT(M.make_config("wan2.1-t2v-1.3b"))
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == shapes
    assert net.num_params() == 1_418_996_800
    with torch.device("meta"):
        net = M.DiT(M.make_config("wan2.1-t2v-1.3b", prope="branch"))
    sd = net.state_dict()
    extra = {k: list(v.shape) for k, v in sd.items() if k not in shapes}
    assert all("prope" in k for k in extra) and len(extra) == 2 * 30
    assert {k: list(v.shape) for k, v in sd.items() if k in shapes} == shapes
    assert net.num_params() == 1_418_996_800 + 30 * (1536 * 1536 + 1536)


def test_toy_presets_on_meta():
    # the embedded world's two sizes: tiny (the shipped chain) and small (~3.2x the parameters;
    # LONG_ROLLOUTS.md); both have 64-wide heads, half of each head's channels under inline PRoPE
    counts = {}
    for name in ("tiny", "small"):
        cfg = M.make_config(name)
        with torch.device("meta"):
            counts[name] = M.DiT(cfg).num_params()
        assert cfg.inline_prope_dim == cfg.head_dim // 2 and cfg.in_channels == 25
    assert counts == {"tiny": 1_229_488, "small": 3_918_192}
    assert M.make_config("small").head_dim == M.make_config("tiny").head_dim == 64


def tiny(prope_mode, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = M.ModelConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, out_channels=4, in_channels=9,
                        text_dim=8, freq_dim=16, prope=prope_mode, chunk=2, **kw)
    return M.DiT(cfg).eval()


def inputs(B=2, F=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, F, 4, 4, generator=g)
    return x, torch.tensor([300.0, 700.0][:B]), torch.randn(B, 3, 8, generator=g), random_cameras(B, F, g)


@pytest.mark.parametrize("mode", ["inline", "branch"])
def test_prope_invariance_to_world_frame(mode):
    net = tiny(mode)
    if mode == "branch":
        with torch.no_grad():
            for blk in net.blocks:
                blk.self_attn.prope_proj.weight.normal_(0, 0.3)
    x, t, ctx, cams = inputs()
    G = random_cameras(1, 1, torch.Generator().manual_seed(5), trans=2.0).w2c[0, 0]
    moved = prope.Cameras(cams.w2c @ G, cams.K)
    with torch.no_grad():
        a, b = net(x, t, ctx, cams), net(x, t, ctx, moved)
        assert ((a - b).norm() / a.norm()) < 1e-4
        # (c) changing one frame's camera changes the output; (d) so does scaling all translations
        one = prope.Cameras(cams.w2c.clone(), cams.K)
        one.w2c[:, 2] = random_cameras(2, 1, torch.Generator().manual_seed(9)).w2c[:, 0]
        assert ((net(x, t, ctx, one) - a).norm() / a.norm()) > 1e-3
        scaled = prope.Cameras(cams.w2c.clone(), cams.K)
        scaled.w2c[..., :3, 3] *= 3.0
        assert ((net(x, t, ctx, scaled) - a).norm() / a.norm()) > 1e-3


def test_branch_is_exact_at_init_and_reaches_output_when_nonzero():
    net = tiny("branch")
    x, t, ctx, cams = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx, cams), net(x, t, ctx, None))
        net.blocks[0].self_attn.prope_proj.weight.normal_(0, 0.3)
        assert (net(x, t, ctx, cams) - net(x, t, ctx, None)).abs().max() > 1e-3


def test_enable_prope_branch_on_a_camera_free_base_equals_a_model_built_with_it():
    # Phase 1 from a camera-free base (Wan2.1) adds the branch in place (train_bidir --init): exact at init,
    # and once its projections have weights, the same function as a DiT built with prope="branch"
    net = tiny("none", seed=4)
    x, t, ctx, cams = inputs()
    with torch.no_grad():
        base = net(x, t, ctx, cams)
        assert M.enable_prope_branch(net) is net and net.cfg.prope == "branch"
        assert torch.equal(net(x, t, ctx, cams), base)
        built = tiny("branch", seed=9)
        assert set(net.state_dict()) == set(built.state_dict())
        for block in net.blocks:
            block.self_attn.prope_proj.weight.normal_(0, 0.3)
        built.load_state_dict(net.state_dict())
        got = net(x, t, ctx, cams)
        assert (got - built(x, t, ctx, cams)).abs().max() < 1e-6
        assert (got - base).abs().max() > 1e-3  # the new branch reaches the output
    inline = tiny("inline", seed=4)  # a model that has PRoPE keeps it: nothing added
    keys = set(inline.state_dict())
    assert M.enable_prope_branch(inline).cfg.prope == "inline" and set(inline.state_dict()) == keys


def test_branch_in_one_call_equals_two_attentions():
    """The PRoPE branch rides as H more heads of the main SDPA call; written out as two calls, the same."""
    net = tiny("branch", seed=2)
    attn = net.blocks[0].self_attn
    with torch.no_grad():
        attn.prope_proj.weight.normal_(0, 0.3)
    B, F, tpf, H, D = 2, 2, 4, attn.cfg.num_heads, attn.cfg.head_dim
    g = torch.Generator().manual_seed(3)
    x, cams = torch.randn(B, F * tpf, attn.cfg.dim, generator=g), random_cameras(B, F, g)
    P, Pi = cams.matrices()  # (B, F, 4, 4) each
    rope = M.rope_tables(D, torch.arange(F), 2, 2, attn.cfg.rope_theta, "cpu")
    pos = dict(cams=(P, Pi), rope=rope, mask=None, cache=None, n_frames=F, commit=False)
    with torch.no_grad():
        got = attn(x, pos)
        split = lambda t: t.view(B, -1, H, D).transpose(1, 2)
        q, k, v = split(attn.norm_q(attn.q(x))), split(attn.norm_k(attn.k(x))), split(attn.v(x))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        main = sdpa(M.apply_rope(q, *rope), M.apply_rope(k, *rope), v)
        side = prope.apply(sdpa(prope.apply(q, P.mT), prope.apply(k, Pi), prope.apply(v, Pi)), P)
        merge = lambda o: o.transpose(1, 2).reshape(B, -1, H * D)
        want = attn.o(merge(main)) + attn.prope_proj(merge(side))
    assert (got - want).abs().max() < 1e-5
    assert (attn.prope_proj(merge(side))).abs().max() > 1e-2  # the branch counts


def test_prope_closed_form_inverse():
    cams = random_cameras(2, 3, torch.Generator().manual_seed(2))
    P, Pi = cams.matrices()
    assert (P @ Pi - torch.eye(4)).abs().max() < 1e-5
    assert (torch.linalg.inv(P) - Pi).abs().max() < 1e-4


def test_teacher_forcing_mask_hand_checked():
    m = M.teacher_forcing_mask(frames=4, chunk=2, tokens_per_frame=1).int()
    expect = torch.tensor([
        # clean c0 c0 c1 c1 | noisy c0 c0 c1 c1
        [1, 1, 0, 0, 0, 0, 0, 0],  # clean f0 (chunk 0)
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # clean f2 (chunk 1) sees clean chunks <= 1
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # noisy chunk 0 sees only itself
        [0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1],  # noisy chunk 1 sees clean chunk 0 and itself
        [1, 1, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(m, expect)


def test_teacher_forcing_mask_with_sink_and_window():
    m = M.teacher_forcing_mask(frames=8, chunk=2, tokens_per_frame=1, sink=1, window=3).int()
    clean = m[:8, :8]
    # chunk 3 (frames 6, 7) sees the sink (frame 0), the 3 frames before it (3, 4, 5) and itself
    assert clean[6].tolist() == [1, 0, 0, 1, 1, 1, 1, 1]
    assert clean[2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # chunk 1: everything before is in the window
    assert m[8 + 6, :8].tolist() == [1, 0, 0, 1, 1, 1, 0, 0] and m[8 + 6, 8:].tolist() == [0] * 6 + [1, 1]
    assert torch.equal(M.teacher_forcing_mask(8, 2, 1, window=100), M.teacher_forcing_mask(8, 2, 1))


@pytest.mark.parametrize("sink,window", [(1, 3), (0, 4), (2, 2)])
def test_windowed_cache_rollout_equals_windowed_teacher_forcing(sink, window):
    """Past the window the ring evicts the oldest frames; the commit pass must still see them."""
    net = tiny("inline", seed=4)
    B, F = 1, 12  # 6 chunks of 2 frames: the ring fills and wraps
    g = torch.Generator().manual_seed(2)
    clean, noisy = torch.randn(B, 4, F, 4, 4, generator=g), torch.randn(B, 4, F, 4, 4, generator=g)
    ctx, cams = torch.randn(B, 3, 8, generator=g), random_cameras(B, F, g)
    cond = M.image_cond(clean[:, :, 0], F)
    t = torch.rand(B, F // 2, generator=g).repeat_interleave(2, 1) * 1000
    with torch.no_grad():
        tf = net(noisy, t, ctx, cams, cond, clean=clean, sink=sink, window=window)
        cache = net.new_cache(B, 4, 4, sink=sink, window=window)
        outs = []
        for s in range(0, F, 2):
            sl = slice(s, s + 2)
            outs.append(net(noisy[:, :, sl], t[:, sl], ctx, cams.frames(s, s + 2), cond[:, :, sl], cache=cache,
                            frame_offset=s))
            net(clean[:, :, sl], torch.zeros(B, 2), ctx, cams.frames(s, s + 2), cond[:, :, sl], cache=cache,
                frame_offset=s, commit=True)
        assert (torch.cat(outs, 2) - tf).abs().max() < 1e-4
        full = net(noisy, t, ctx, cams, cond, clean=clean)
        assert (full - tf).abs().max() > 1e-3  # the window does cut the context


def test_rollout_remembers_the_given_first_frame_not_its_reproduction():
    # frame 0 is given (image_cond): teacher forcing trains every chunk on the image itself as context, so the
    # rollout's cache must hold the image, not the model's reproduction of it (which is never exact)
    net = tiny("inline", seed=5)
    B, F = 2, 4
    g = torch.Generator().manual_seed(6)
    first, noise = torch.randn(B, 4, 4, 4, generator=g), torch.randn(B, 4, F, 4, 4, generator=g)
    ctx, cams = torch.randn(B, 3, 8, generator=g), random_cameras(B, F, g)
    cond = M.image_cond(first, F)
    one_step = [1.0, 0.0]  # one Euler step: a chunk is noise - v
    with torch.no_grad():
        x = M.sample_ar(net, noise, ctx, cams, cond, one_step, sink=1, window=8)
        assert torch.equal(x[:, :, 0], first)
        t = torch.full((B, F), 1000.0)
        own = noise[:, :, :2] - net(noise[:, :, :2], t[:, :2], ctx, cams.frames(0, 2), cond[:, :, :2])  # chunk 0, drawn
        assert (own[:, :, 1] - x[:, :, 1]).abs().max() < 1e-5 and (own[:, :, 0] - first).abs().max() > 1e-2
        for frame0, agrees in ((first, True), (own[:, :, 0], False)):
            clean = torch.cat([frame0[:, :, None], x[:, :, 1:]], 2)  # chunk 0 as the cache should hold it
            want = noise[:, :, 2:] - net(noise, t, ctx, cams, cond, clean=clean)[:, :, 2:]
            assert ((x[:, :, 2:] - want).abs().max() < 1e-4) == agrees


def test_cache_attends_to_what_it_holds_without_a_mask():
    net = tiny("inline")
    cache = net.new_cache(1, 4, 4, sink=1, window=64)
    tpf = 4
    sizes = []
    for f in range(0, 6, 2):
        kv, mask = cache.attend(0, [torch.zeros(1, 2, 2 * tpf, net.cfg.head_dim)] * 2, 2, commit=True)
        sizes.append(kv[0].shape[2])
        assert mask is None
        cache.advance(2)
    assert sizes == [2 * tpf, 4 * tpf, 6 * tpf]  # not the 1 + 64 + 2 frames the cache could hold


@pytest.mark.parametrize("mode", ["inline", "branch", "none"])
def test_cache_rollout_equals_teacher_forcing(mode):
    net = tiny(mode, seed=3)
    if mode == "branch":
        with torch.no_grad():
            for blk in net.blocks:
                blk.self_attn.prope_proj.weight.normal_(0, 0.3)
    B, F = 2, 6  # 3 chunks of 2 frames
    g = torch.Generator().manual_seed(1)
    clean, noisy = torch.randn(B, 4, F, 4, 4, generator=g), torch.randn(B, 4, F, 4, 4, generator=g)
    ctx, cams = torch.randn(B, 3, 8, generator=g), random_cameras(B, F, g)
    cond = M.image_cond(clean[:, :, 0], F)
    t = torch.tensor([[900.0, 900.0, 500.0, 500.0, 100.0, 100.0], [700.0, 700.0, 300.0, 300.0, 50.0, 50.0]])
    with torch.no_grad():
        tf = net(noisy, t, ctx, cams, cond, clean=clean)
        cache = net.new_cache(B, 4, 4, sink=1, window=8)
        outs = []
        for s in range(0, F, 2):
            sl = slice(s, s + 2)
            c_cams, c_cond = cams.frames(s, s + 2), cond[:, :, sl]
            outs.append(net(noisy[:, :, sl], t[:, sl], ctx, c_cams, c_cond, cache=cache, frame_offset=s))
            net(clean[:, :, sl], torch.zeros(B, 2), ctx, c_cams, c_cond, cache=cache, frame_offset=s, commit=True)
        rolled = torch.cat(outs, 2)
        assert (rolled - tf).abs().max() < 1e-4
        bidir = net(noisy, t, ctx, cams, cond)
        assert (bidir - tf).abs().max() > 1e-2  # the mask is not a no-op


def test_cache_sliding_window_keeps_memory_flat():
    net = tiny("inline")
    x, _, ctx, _ = inputs(B=1, F=2)
    cache = net.new_cache(1, 4, 4, sink=1, window=3)
    size = sum(t.numel() for layer in cache.kv for t in layer)
    cams = random_cameras(1, 20, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s in range(0, 20, 2):
            net(x, torch.zeros(1), ctx, cams.frames(s, s + 2), cache=cache, frame_offset=s, commit=True)
    assert sum(t.numel() for layer in cache.kv for t in layer) == size
    assert cache.frames_written == 20 and cache.filled == 1 + 3


def test_bad_input_messages(tmp_path):
    net = tiny("inline")
    x, t, ctx, cams = inputs()
    with pytest.raises(ValueError, match="latent channels"):
        net(torch.randn(2, 5, 4, 4, 4), t, ctx, cams)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        net(torch.randn(2, 4, 4, 5, 4), t, ctx)
    with pytest.raises(ValueError, match="cameras cover"):
        net(x, t, ctx, cams.frames(0, 2))
    # a checkpoint of another architecture
    save_file({"double_blocks.0.img_attn_q.weight": torch.zeros(4, 4)}, tmp_path / "hy.safetensors")
    with pytest.raises(ValueError, match="HunyuanVideo") as e:
        M.load_pretrained(tmp_path / "hy.safetensors")
    assert "\n" not in str(e.value)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a Wan-layout DiT"):
        M.load_pretrained(tmp_path / "x.safetensors")
    # a truncated file
    ref = random_diffusers_wan(2, 12, 1)
    ref.save_pretrained(tmp_path / "d")
    f = tmp_path / "d" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable .safetensors") as e:
        M.load_pretrained(tmp_path / "d")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no such file"):
        M.load_pretrained(tmp_path / "missing.safetensors")
    # a right-architecture file of the wrong size is named key by key
    sd = tiny("none").state_dict()
    sd["blocks.0.ffn.0.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="blocks.0.ffn.0.weight"):
        M.load_state(tiny("none"), sd, "bad.safetensors")


def test_schedule_facts():
    assert M.shift_sigma(torch.tensor(0.5), 5.0).item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    s = M.few_step_sigmas((1000, 750, 500, 250), shift=5.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and s[2] == pytest.approx(5 / 6)
    x0, n = torch.randn(3), torch.randn(3)
    xt = M.add_noise(x0, n, 0.3)
    assert torch.allclose(xt - 0.3 * (n - x0), x0, atol=1e-6)  # x0 = x_t - sigma v


def test_bf16_parameters_run_forward_and_rollout_close_to_fp32():
    net = M.load_pretrained("assets/dmd").eval()
    half = M.load_pretrained("assets/dmd").to(torch.bfloat16).eval()
    x, t, ctx, cams = inputs(B=2, F=4)
    x = torch.randn(2, 12, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    cond = M.image_cond(x[:, :, 0], 4)
    with torch.no_grad():
        a, b = net(x, t, ctx, cams, cond), half(x, t, ctx, cams, cond)
        assert b.dtype == torch.float32  # velocities come back in the latents' dtype
        assert (a - b).abs().mean() < 0.01 * a.abs().mean() + 1e-3 and (a - b).abs().max() < 0.1
        few = M.few_step_sigmas()
        s1 = M.sample_ar(net, x, ctx, cams, cond, few, renoise=True, generator=torch.Generator().manual_seed(0))
        s2 = M.sample_ar(half, x, ctx, cams, cond, few, renoise=True, generator=torch.Generator().manual_seed(0))
        assert (s1 - s2).abs().mean() < 0.02 * s1.abs().mean() and (s1 - s2).abs().max() < 0.1


def test_flex_block_mask_teacher_forcing_equals_the_dense_mask():
    import warnings
    net = tiny("inline", seed=5)
    B, F = 2, 6
    g = torch.Generator().manual_seed(3)
    clean, noisy = torch.randn(B, 4, F, 4, 4, generator=g), torch.randn(B, 4, F, 4, 4, generator=g)
    ctx, cams, t = torch.randn(B, 3, 8, generator=g), random_cameras(B, F, g), torch.rand(B, F, generator=g) * 1000
    cond = M.image_cond(clean[:, :, 0], F)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled on the CPU
        for sink, window in ((0, None), (1, 2)):
            net.flex = False
            dense = net(noisy, t, ctx, cams, cond, clean=clean, sink=sink, window=window)
            net.flex = True
            flex = net(noisy, t, ctx, cams, cond, clean=clean, sink=sink, window=window)
            assert (dense - flex).abs().max() < 1e-5
    for sink, window in ((0, None), (1, 2), (2, 1)):  # the BlockMask's rule, token by token, is the dense mask
        block = M.teacher_forcing_block_mask(F, 2, 4, torch.device("cpu"), sink, window)
        n = torch.arange(2 * F * 4)
        assert torch.equal(block.mask_mod(0, 0, n[:, None], n[None, :]), M.teacher_forcing_mask(F, 2, 4, None, sink, window))


def test_activation_checkpointing_gives_the_same_gradients():
    net = tiny("inline", seed=6)
    B, F = 2, 4
    g = torch.Generator().manual_seed(4)
    clean, noisy = torch.randn(B, 4, F, 4, 4, generator=g), torch.randn(B, 4, F, 4, 4, generator=g)
    ctx, cams, t = torch.randn(B, 3, 8, generator=g), random_cameras(B, F, g), torch.rand(B, F, generator=g) * 1000
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.grad_ckpt = ckpt
        net(noisy, t, ctx, cams, M.image_cond(clean[:, :, 0], F), clean=clean).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() < 1e-6


def test_noisy_context_rollout_equals_teacher_forcing_on_the_same_noisy_context():
    """model.commit puts a chunk in the cache noised to cfg.context_sigma (frame 0 clean), t = 1000 sigma:
    exactly the context teacher forcing sees with clean=that noisy clip, clean_t=its timesteps."""
    net = tiny("inline", seed=7, context_sigma=0.4)
    B, F = 2, 6
    g = torch.Generator().manual_seed(5)
    clean, noisy = torch.randn(B, 4, F, 4, 4, generator=g), torch.randn(B, 4, F, 4, 4, generator=g)
    ctx, cams, t = torch.randn(B, 3, 8, generator=g), random_cameras(B, F, g), torch.rand(B, F, generator=g) * 1000
    cond = M.image_cond(clean[:, :, 0], F)
    draws = torch.Generator().manual_seed(11)
    eps = torch.cat([torch.randn(B, 4, 2, 4, 4, generator=draws) for _ in range(F // 2)], 2)  # commit's draws, in order
    sigma = torch.full((B, F), 0.4)
    sigma[:, 0] = 0.0  # frame 0 (the sink: the given image) stays clean
    with torch.no_grad():
        tf = net(noisy, t, ctx, cams, cond, clean=M.add_noise(clean, eps, sigma[:, None, :, None, None]),
                 clean_t=1000 * sigma)
        cache, outs, draws = net.new_cache(B, 4, 4, sink=1, window=8), [], torch.Generator().manual_seed(11)
        for s in range(0, F, 2):
            sl = slice(s, s + 2)
            outs.append(net(noisy[:, :, sl], t[:, sl], ctx, cams.frames(s, s + 2), cond[:, :, sl], cache=cache,
                            frame_offset=s))
            M.commit(net, cache, clean[:, :, sl], s, ctx, cams.frames(s, s + 2), cond[:, :, sl], draws)
        assert (torch.cat(outs, 2) - tf).abs().max() < 1e-4
        plain = net(noisy, t, ctx, cams, cond, clean=clean)
        assert (plain - tf).abs().max() > 1e-3  # the context noise does change what the model sees


def test_noisy_context_levels():
    cfg = M.make_config("tiny", context_noise=0.8)
    g = torch.Generator().manual_seed(0)
    x0, noise, u = torch.randn(3, 12, 6, 4, 4, generator=g), torch.randn(3, 12, 6, 4, 4, generator=g), torch.rand(3, 6, generator=g)
    ctx, t = M.noisy_context(x0, u, noise, cfg, chunk=2)
    assert torch.equal(ctx[:, :, 0], x0[:, :, 0]) and (t[:, 0] == 0).all()  # frame 0: the given image, clean
    assert torch.equal(t[:, 2], t[:, 3]) and (t <= 800).all() and t[:, 2:].min() >= 0  # one level per chunk
    sigma = (t / 1000)[:, None, :, None, None]
    assert torch.allclose(ctx, (1 - sigma) * x0 + sigma * noise)
    assert M.noisy_context(x0, u, noise, M.make_config("tiny"), 2) == (x0, None)  # a clean-context model


def test_qk_norms_take_the_inputs_dtype_under_autocast():
    """Under bf16 autocast (training on a GPU) the q/k RMSNorms see bf16 inputs and fp32 master weights: torch's
    fused kernel refuses mixed dtypes and falls back, warning, to an unfused one - so the norm casts its weight,
    and the gradient still reaches the fp32 weight."""
    from torch.overrides import TorchFunctionMode
    calls = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.nn.functional.rms_norm, torch.rms_norm):
                calls.append((args[0].dtype, (args[2] if len(args) > 2 else kwargs["weight"]).dtype))
            return func(*args, **kwargs)

    net = tiny("inline").train()
    x, t, ctx, cams = inputs(B=1, F=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
        net(x, t, ctx, cams).float().square().mean().backward()
    assert len(calls) >= 3 * len(net.blocks)  # self-attention q, k and cross-attention q, k (each maybe twice)
    assert set(calls) == {(torch.bfloat16, torch.bfloat16)}
    w = net.blocks[0].self_attn.norm_q.weight
    assert w.dtype == torch.float32 and w.grad is not None and w.grad.abs().sum() > 0


def test_commit_frames_oracle_the_own_frames_give_the_rollout_and_a_fixed_memory_cuts_the_past_off():
    """sample_ar(commit_frames=...) gives the cache those latents in place of the generated chunks (metric.py long
    --context): given back its own frames it is the rollout itself; given fixed frames, a chunk no longer depends on
    what earlier chunks drew, which it does when the cache holds the model's own frames."""
    net = M.load_pretrained("assets/dmd").eval()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 12, 8, 16, 16, generator=g) * 0.5  # (B, C, F, h, w) stand-in frames to remember
    noise, ctx = torch.randn(1, 12, 8, 16, 16, generator=g), torch.randn(1, 16, 64, generator=g)
    cams = random_cameras(1, 8, g)
    cond, few = M.image_cond(x0[:, :, 0], 8), M.few_step_sigmas()
    other = noise.clone()
    other[:, :, :2] = torch.randn(1, 12, 2, 16, 16, generator=g)  # chunk 0 drawn from other noise
    roll = lambda n, frames=None: M.sample_ar(net, n, ctx, cams, cond, few, renoise=True, sink=M.STREAM_SINK, window=4,
                                              generator=torch.Generator().manual_seed(0), commit_frames=frames)
    own = roll(noise)
    assert torch.equal(roll(noise, own), own)  # its own frames given back: the same rollout, bit for bit
    assert (roll(other)[:, :, 2:] - own[:, :, 2:]).abs().max() > 1e-3  # own memory: chunk 0 shapes the rest
    fixed, fixed_other = roll(noise, x0), roll(other, x0)
    assert torch.equal(fixed[:, :, 2:], fixed_other[:, :, 2:])  # a fixed memory: the rest does not depend on chunk 0
    assert not torch.equal(fixed[:, :, :2], fixed_other[:, :, :2])
