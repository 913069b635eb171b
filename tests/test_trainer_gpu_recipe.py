"""The GPU recipe's parts that run on a CPU too: the ResNet-12 backbone (shape, size, checkpoints,
ONNX export through `protoedge export` and the runtime at 84x84), image folders read by DataLoader
workers, and the recipe's settings. (CUDA, NCCL and torch.compile are not exercised here.)"""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from protoedge import datasets
from protoedge.cli import main
from protoedge.trainer import checkpoint as ckpt
from protoedge.trainer.config import recipe_config
from protoedge.trainer.data import FolderPool, resize_pixels
from protoedge.trainer.model import Decoder, Encoder, EncoderConfig

torch.set_num_threads(1)


def test_resnet12_is_the_literature_network():
    enc = Encoder(EncoderConfig(backbone="resnet12", input_size=84, in_channels=3))
    widths = [b.body[0].out_channels for b in enc.features]
    assert widths == [64, 160, 320, 640]
    assert enc.embedding_dim == 640
    assert 12.3e6 < sum(p.numel() for p in enc.parameters()) < 12.5e6  # ResNet-12's 12.4 M parameters
    assert isinstance(enc.features[0].body[2], torch.nn.LeakyReLU) and enc.features[0].body[2].negative_slope == 0.1
    with pytest.raises(ValueError, match="backbone"):
        Encoder(EncoderConfig(backbone="vgg"))


def test_tiny_resnet12_contract_decoder_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(backbone="resnet12", width=4, input_size=84, in_channels=3))
    x = torch.randint(0, 256, (5, 3, 84, 84), dtype=torch.uint8)
    z = enc(x)
    assert z.shape == (5, 40) and z.dtype == torch.float32
    assert Decoder(enc)(z).shape == (5, 3, 84, 84)
    enc.eval()
    path = ckpt.save_checkpoint(tmp_path / "r.safetensors", enc, {"distance": "cosine"})
    loaded, meta = ckpt.load_encoder(path)
    assert meta["encoder_config"]["backbone"] == "resnet12" and torch.equal(loaded(x), enc(x))


def test_checkpoints_from_before_the_backbone_field_are_conv4(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    path = ckpt.save_checkpoint(tmp_path / "new.safetensors", Encoder().eval(), {"distance": "cosine"})
    _, meta = ckpt.load_checkpoint(path)
    del meta["encoder_config"]["backbone"]  # the header as the trainer wrote it before the field existed
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"protoedge": json.dumps(meta)})
    enc, meta = ckpt.load_encoder(tmp_path / "old.safetensors")
    assert "backbone" not in meta["encoder_config"] and enc.config.backbone == "conv4"
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(enc(x), ckpt.load_encoder(path)[0](x))


def test_gpu_recipe_settings():
    cfg = recipe_config("gpu", "omniglot-a")
    assert (cfg.backbone, cfg.image_size, cfg.channels_last, cfg.compile, cfg.precision) == \
        ("resnet12", 84, True, True, "bf16")
    assert cfg.cluster_ks == recipe_config("default").cluster_ks  # otherwise the default recipe
    assert recipe_config("default").episodes_per_step == 0  # one per process


def test_resize_pixels_keeps_uint8_and_ink():
    x = np.zeros((3, 1, 28, 28), np.uint8)
    x[:, :, 10:18, 10:18] = 255
    y = resize_pixels(x, 84)
    assert y.shape == (3, 1, 84, 84) and y.dtype == torch.uint8
    assert y[:, :, 36:48, 36:48].min() == 255 and y[:, :, :20].max() == 0
    assert resize_pixels(y, 84) is y


@pytest.mark.slow
def test_protoedge_export_and_runtime_take_a_resnet12_at_84(tmp_path):
    from protoedge.export import pipeline
    from protoedge.runtime import Runtime, load_bundle

    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(backbone="resnet12", width=4, input_size=84))
    enc.train()(torch.randint(0, 256, (32, 1, 84, 84), dtype=torch.uint8))  # non-trivial BN statistics
    enc.eval()
    path = ckpt.save_checkpoint(tmp_path / "r.safetensors", enc, {"distance": "cosine", "temperature": 5.0,
                                                                  "config": {"protocol": "omniglot-a"}})
    test = datasets.load_split("omniglot-a", "test")
    keep = test.labels < 8
    images = resize_pixels(test.images[keep], 84).numpy()
    np.savez(tmp_path / "eval.npz", images=images, labels=test.labels[keep])
    np.savez(tmp_path / "calib.npz", images=images[::2])
    # what `protoedge export CKPT --precision fp32 --eval eval.npz --calib calib.npz` runs, with quick settings
    opts = pipeline.ExportOptions(precisions=("fp32",), eval=str(tmp_path / "eval.npz"), calib=str(tmp_path / "calib.npz"),
                                  episodes=20, parity_images=64, calib_items=40, speed_repeats=1, speed_batch=8,
                                  progress=False)
    pipeline.export_bundle(path, tmp_path / "bundle", opts)
    bundle = load_bundle(tmp_path / "bundle")
    m = bundle.manifest
    assert (m["input"]["height"], m["input"]["width"], m["output"]["dim"]) == (84, 84, 40)
    assert m["model"]["name"] == "protoedge-resnet12-4" and m["variants"]["fp32"]["max_abs_diff"] < 1e-4
    rt = Runtime(tmp_path / "bundle", backend="cpu")
    with torch.no_grad():
        want = enc(torch.from_numpy(images[:6])).numpy()
    assert np.abs(rt.embed(images[:6]) - want).max() < 1e-4


def write_folder(root, n=48):
    """Unlabelled images of several sizes, modes and formats, in nested folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"part{i % 3}" / ("deep" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        if i % 2:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"img{i}.jpg")
        else:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(sub / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")


def test_folder_pool_reads_lazily_with_workers_in_the_requested_order(tmp_path):
    write_folder(tmp_path / "imgs")
    pool = FolderPool(tmp_path / "imgs", size=32, channels=3, workers=2, chunk=4)
    assert len(pool) == 48 and pool.shape == (3, 32, 32)
    order = np.array([40, 3, 17, 3, 0, 47, 22, 9, 31, 5, 11])
    got = pool.take(order)
    assert got.shape == (11, 3, 32, 32) and got.dtype == torch.uint8
    for row, i in zip(got, order):  # the same pixels protoedge.datasets makes of that file
        want = datasets.load_images(pool.files[i], size=(32, 32), channels=3).images[0]
        assert np.array_equal(row.numpy(), want)
    assert torch.equal(pool.take(order[::-1]), got.flip(0))  # persistent workers, a new order each time
    assert FolderPool(tmp_path / "imgs", 32, 3, workers=0).fingerprint == pool.fingerprint
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DataError, match="no images"):
        FolderPool(tmp_path / "empty", 32, 3)


@pytest.mark.slow
def test_training_on_an_image_folder(tmp_path, monkeypatch):
    from protoedge.trainer import train as train_mod

    write_folder(tmp_path / "imgs")
    cfg = recipe_config("default", "omniglot-a", data=str(tmp_path / "imgs"), image_size=32, channels=3,
                        data_workers=2, width=8, ae_steps=2, ae_batch=8, steps=3, aug_way=8, cluster_way=3,
                        cluster_shot=1, cluster_query=1, cluster_ks=[6], cluster_pool=30, cluster_start=0.3,
                        recon_batch=4, precision="fp32", threads=1, log_every=1, pixel_mean=0.5, pixel_std=0.25)
    path = train_mod.train(cfg, tmp_path / "run", progress=False)
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta["encoder_config"]["in_channels"] == 3 and meta["encoder_config"]["input_size"] == 32
    assert meta["encoder_config"]["pixel_mean"] == 0.5 and meta["state"]["step"] == 3
    assert meta["data_fingerprint"] == FolderPool(tmp_path / "imgs", 32, 3, workers=0).fingerprint
    part = tensors["partition.0"].numpy()
    assert (part >= 0).sum() == 30 and (part == -1).sum() == 18  # k-means on a sampled subset
    log = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_aug", "loss_cluster", "loss_recon"} <= set().union(*log)
    assert "val_5w1s" not in set().union(*log)  # no labelled validation for a folder
