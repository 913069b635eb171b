"""The install layout, the shipped data and the CLI surface."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protoedge import datasets
from protoedge.cli import main


def test_one_namespace_no_stray_top_level_modules():
    site = Path(sysconfig.get_paths()["purelib"])
    for name in ("trainer", "runtime", "export"):
        assert not (site / name).exists(), f"{name} leaked into site-packages"
    import protoedge.export
    import protoedge.runtime
    import protoedge.trainer
    assert protoedge.runtime.__name__ == "protoedge.runtime"


def test_protocol_a_is_the_vinyals_split_and_disjoint():
    train, test = datasets.load_split("omniglot-a", "train"), datasets.load_split("omniglot-a", "test")
    assert train.images.shape == (24000, 1, 28, 28) and test.images.shape == (8460, 1, 28, 28)
    assert len(set(train.class_names)) == 1200 and len(set(test.class_names)) == 423
    assert not set(train.class_names) & set(test.class_names)
    # every class has exactly 20 drawings
    assert np.all(np.bincount(test.labels) == 20)


def test_protocol_b_is_background_to_evaluation():
    train, test = datasets.load_split("omniglot-b", "train"), datasets.load_split("omniglot-b", "test")
    assert len(train.class_names) == 964 and len(test.class_names) == 659
    alphabets = lambda s: {n.split("/")[0] for n in s.class_names}
    assert not alphabets(train) & alphabets(test)


def test_mnist_split_and_ink_convention():
    test = datasets.load_split("mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(test.labels).tolist()[:3] == [980, 1135, 1032]
    # ink is high: the border is background (0)
    assert test.images[:, :, 0, :].mean() < 1


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(datasets.DataError, match="unknown protocol"):
        datasets.load_split("imagenet", "train")


def test_image_folder_labelled_and_unlabelled(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "lab" / cls / f"{i}.png")
    s = datasets.load_images(tmp_path / "lab", size=(28, 28), channels=1)
    assert s.images.shape == (6, 1, 28, 28) and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.class_names == ["a", "b"]
    flat = datasets.load_images(tmp_path / "lab" / "a", size=(28, 28), channels=3)
    assert flat.images.shape == (3, 3, 28, 28) and flat.labels is None


def test_corrupt_image_error_names_the_file(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(datasets.DataError, match="ok.png"):
        datasets.load_images(tmp_path)


def test_npz_and_npy_loading(tmp_path):
    x = np.zeros((5, 28, 28), np.uint8)
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(5))
    np.save(tmp_path / "b.npy", x)
    assert datasets.load_images(tmp_path / "a.npz").labels.tolist() == [0, 1, 2, 3, 4]
    assert datasets.load_images(tmp_path / "b.npy").images.shape == (5, 1, 28, 28)
    np.save(tmp_path / "c.npy", x.astype(np.float32))
    with pytest.raises(datasets.DataError, match="uint8"):
        datasets.load_images(tmp_path / "c.npy")


def test_cli_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "eval", "export", "info", "cluster", "serve", "bench", "demo", "report"):
        assert cmd in result.output


def test_cli_entry_point_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "protoedge.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "protoedge" in out.stdout


def test_torch_commands_without_torch_name_the_extra(tmp_path):
    # sys.modules["torch"] = None makes every `import torch` fail, as on a device install.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from click.testing import CliRunner\n"
            "from protoedge.cli import main\n"
            f"for args in (['train', '--out', r'{tmp_path}'], ['eval', 'x.safetensors'], ['bench', 'fewshot']):\n"
            "    r = CliRunner().invoke(main, args)\n"
            "    assert r.exit_code != 0 and 'protoedge[train]' in r.output, (args, r.output, r.exception)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr + out.stdout
