"""data.py: where a training batch comes from, the codecs, the real-data cache."""
import json

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cameras
import data
import model as M
from prope import Cameras



# ---------------------------------------------------------------------------------------------
# training_source: the batches every stage reads

def source_of(seed=0, batch_size=4, **kw):
    cfg = type("C", (), {**dict(seed=seed, batch_size=batch_size, frames=4, height=16, width=16, text_len=8,
                                text_drop=0.0, camera_noise=0.0, data=""), **kw})
    return data.training_source(cfg, M.make_config("tiny"))[1]


def test_training_source_is_the_same_batch_on_any_number_of_ranks():
    source = source_of()
    whole = source(3, 0, 1)
    halves = [source(3, rank, 2) for rank in (0, 1)]
    for key in ("x0", "noise", "u", "text"):
        assert whole[key].shape[0] == 4
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))
    assert torch.equal(whole["cameras"].w2c, torch.cat([h["cameras"].w2c for h in halves]))
    again = source(3, 0, 1)  # a resumed run draws the same step again
    assert torch.equal(again["x0"], whole["x0"]) and torch.equal(again["noise"], whole["noise"])
    assert not torch.equal(source(4, 0, 1)["x0"], whole["x0"])  # the next step is other clips
    assert not torch.equal(source_of(seed=1)(3, 0, 1)["x0"], whole["x0"])  # another seed, other clips
    assert whole["x0"].shape == (4, 12, 4, 8, 8) and whole["u"].shape == (4, 4)  # pixel codec: 16x16 -> 12 x 8 x 8
    jittered = source_of(camera_noise=0.05)(3, 0, 1)["cameras"].w2c
    assert torch.equal(jittered[:, 0], whole["cameras"].w2c[:, 0]) and (jittered - whole["cameras"].w2c).abs().max() > 0.01


# ---------------------------------------------------------------------------------------------
# codecs

def test_pixel_codec_exact():
    video = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    for factor in (1, 2, 4):
        codec = data.PixelCodec(factor)
        latents = codec.encode(video)
        assert latents.shape == (2, 3 * factor**2, 5, 16 // factor, 24 // factor)
        assert (codec.channels, codec.spatial, codec.temporal) == (3 * factor**2, factor, 1)
        assert torch.equal(codec.decode(latents), video)
    assert torch.equal(data.PixelCodec(2).encode(video)[0, :4, 0, 0, 0], video[0, 0, 0, :2, :2].reshape(-1))


def tiny_vae(**kw):
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    return AutoencoderKLWan(**{"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, **kw}).eval()


def test_wan_vae_streamed_decode_equals_the_whole_clip_decode():
    codec = data.WanVAECodec(tiny_vae())
    latents = torch.randn(1, 4, 7, 6, 8, generator=torch.Generator().manual_seed(0))  # 7 latent frames -> 25 frames
    whole = codec.decode(latents)
    stream = codec.stream()
    parts = [stream.decode(latents[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 6), (6, 7))]  # chunks as they come
    streamed = torch.cat(parts, 2)
    assert streamed.shape == whole.shape == (1, 3, 25, 48, 64)
    assert (streamed - whole).abs().max() < 1e-5
    alone = torch.cat([codec.decode(latents[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 6), (6, 7))], 2)
    assert alone.shape != whole.shape or (alone - whole).abs().max() > 1e-3  # chunks decoded alone differ (seams)
    pixel = data.PixelCodec(2)
    assert pixel.stream() is pixel


def test_wan_vae_codec():
    mean, std = [0.1, -0.2, 0.3, 0.4], [1.5, 2.0, 0.5, 3.0]
    vae = tiny_vae(latents_mean=mean, latents_std=std)
    codec = data.WanVAECodec(vae)
    assert (codec.channels, codec.spatial, codec.temporal) == (4, 8, 4)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (1, 4, 3, 2, 2)  # 4k + 1 = 9 frames -> k + 1 = 3 latent frames
    with torch.no_grad():
        mu = vae.encode(video).latent_dist.mode()
        manual = (mu - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
        decoded = vae.decode(z * torch.tensor(std).view(1, 4, 1, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1, 1)).sample
    assert torch.allclose(z, manual, atol=1e-6)
    out = codec.decode(z)
    assert out.shape == (1, 3, 9, 16, 16) and torch.allclose(out, decoded.clamp(-1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="4k\\+1"):
        codec.encode(video[:, :, :8])
    wan = data.WanVAECodec(tiny_vae(z_dim=16, latents_mean=None, latents_std=None))  # no constants in the config
    assert torch.equal(wan.mean.flatten(), torch.tensor(data.WAN_MEAN))
    assert torch.equal(wan.std.flatten(), torch.tensor(data.WAN_STD))
    plain = data.WanVAECodec(tiny_vae())  # z_dim 4 with the config's 16 default constants: no normalization
    assert torch.equal(plain.mean.flatten(), torch.zeros(4)) and torch.equal(plain.std.flatten(), torch.ones(4))



def test_wan_vae_normalization_follows_the_latents_device():
    """The mean/std constants live on the CPU; latents on a GPU must be (de)normalized there (bench.py on an H200
    crashed in the streaming decode: "found at least two devices"). The meta device stands in for the GPU."""
    mean, std = [0.1, -0.2, 0.3, 0.4], [1.5, 2.0, 0.5, 3.0]
    codec = data.WanVAECodec(tiny_vae(latents_mean=mean, latents_std=std))
    z = torch.randn(1, 4, 2, 3, 3)
    on_meta = codec.denormalize(z.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == z.shape
    expected = z * torch.tensor(std).view(1, 4, 1, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1, 1)
    assert torch.allclose(codec.denormalize(z), expected, atol=1e-6)

# ---------------------------------------------------------------------------------------------
# real data: prepare -> LatentDataset

def write_video(path, frames=9, h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(h // 8, w // 8, 3)).repeat(8, 0).repeat(8, 1)
    clip = [np.roll(base, 2 * t, axis=1).astype(np.uint8) for t in range(frames)]
    imageio.mimwrite(path, clip, fps=8, macro_block_size=16)


def tiny_text_encoder(path):
    """A 1-layer random T5 encoder and a word-level tokenizer built offline, saved as one folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    words = ["<pad>", "</s>", "<unk>", "a", "red", "sphere", "blue", "box", "on", "green", "ground"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(words), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(path)


def test_prepare_and_latent_dataset(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    tiny_vae().save_pretrained(tmp_path / "vae")
    tiny_text_encoder(tmp_path / "t5")
    write_video(src / "a.mp4", seed=0)  # JSON v1 cameras (one per video frame) + a caption
    cameras.save_cameras(src / "a.json", cameras.load_cameras("w*4,l*4", trans_step=0.5, rot_step=5), width=64, height=48)
    (src / "a.caption.txt").write_text("a red sphere on green ground\n")
    write_video(src / "b.mp4", seed=1)  # RealEstate10K cameras + a precomputed embedding
    lines = [f"{t} 0.5 0.6 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 {0.25 * t}" for t in range(9)]
    (src / "b.txt").write_text("https://youtu.be/b\n" + "\n".join(lines) + "\n")
    b_text = torch.randn(5, 8)
    save_file({"text": b_text}, src / "b.text.safetensors")
    write_video(src / "c.mp4", seed=2)  # no cameras: skipped with a message
    kw = dict(vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "t5"), frames=9, height=32, width=32,
              text_len=6, shard_size=1)

    assert data.prepare(src, out, **kw) == ["a", "b"]
    assert "skip c: cameras" in capsys.readouterr().out
    ds = data.LatentDataset(out)
    assert len(ds) == 2
    item = ds[0]
    assert item["latents"].shape == (4, 3, 4, 4) and item["w2c"].shape == (3, 4, 4)
    assert item["K"].shape == (3, 4) and item["text"].shape == (6, 8)
    # bit-identical to what prepare computes, and to a manual encoding
    codec = data.WanVAECodec.load(tmp_path / "vae")
    encode_text = data.load_text_encoder(str(tmp_path / "t5"), 6, 0)
    for i, name in enumerate(["a", "b"]):
        fresh = data._prepare_item(src, name, codec, encode_text, 9, 32, 32, 6, "per_clip")
        assert all(torch.equal(ds[i][key], fresh[key]) for key in ("latents", "w2c", "K", "text"))
    video, (h0, w0, rh, rw, top, left) = data.read_video(src / "a.mp4", 9, 32, 32)
    assert (h0, w0, rh, rw, top, left) == (48, 64, 32, 43, 0, 5)
    assert torch.equal(ds[0]["latents"], codec.encode(video[None])[0])
    assert torch.equal(ds[0]["text"], encode_text("a red sphere on green ground"))
    # cameras: frames 0, 4, 8 of the file, per clip scale, principal point moved by the crop
    full = cameras.load_cameras(src / "a.json")
    expected = cameras.normalize_scale(Cameras(full.w2c[:, ::4], full.K[:, ::4]), "per_clip")
    assert torch.allclose(ds[0]["w2c"], expected.w2c[0], atol=1e-6)
    K = torch.tensor([0.8 * 43 / 32, 0.8, (0.5 * 43 - 5) / 32, 0.5])  # resized 48x64 -> 32x43, 5 columns cut
    assert torch.allclose(ds[0]["K"], K.expand(3, 4), atol=1e-6)
    assert torch.allclose(ds[1]["w2c"][:, 2, 3], torch.tensor([0.0, 0.5, 1.0]))  # b moves 2 m: scaled to 1
    assert torch.equal(ds[1]["text"][:5], b_text) and ds[1]["text"][5].abs().sum() == 0  # padded to text_len

    # resume: nothing new to do; then a new item is added and only it is encoded
    shards = sorted(p.name for p in out.glob("shard_*"))
    stamp = (out / shards[0]).stat().st_mtime_ns
    assert data.prepare(src, out, **kw) == []
    cameras.save_cameras(src / "c.json", cameras.load_cameras("d*8", trans_step=0.1), width=64, height=48)
    save_file({"text": torch.randn(3, 8)}, src / "c.text.safetensors")
    assert data.prepare(src, out, **kw) == ["c"]
    assert (out / shards[0]).stat().st_mtime_ns == stamp and len(data.LatentDataset(out)) == 3
    # an interruption after the shard but before the index: the item is redone into the same shard name
    index = json.loads((out / "index.json").read_text())
    index["items"], index["shards"] = index["items"][:2], index["shards"][:2]
    (out / "index.json").write_text(json.dumps(index))
    assert data.prepare(src, out, **kw) == ["c"]
    assert sorted(p.name for p in out.glob("*")) == ["index.json"] + [f"shard_{i:05d}.safetensors" for i in range(3)]
    with pytest.raises(ValueError, match="settings"):
        data.prepare(src, out, **{**kw, "frames": 5})
