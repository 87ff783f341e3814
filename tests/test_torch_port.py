"""Weight port torchvision-format ResNet <-> jaxrepro's Flax ResNet: parity, round trips, errors."""

import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxrepro import models  # noqa: E402
from jaxrepro.compare import torch_port, torch_resnet  # noqa: E402
from jaxrepro.compare.torch_port import PortError  # noqa: E402

torch.set_num_threads(2)
NUM_CLASSES = 10


def _randomise(model, seed):
    """Random BN affine params and running stats, and an fc giving logits of std ~3.

    Each block's last BN gets a smaller scale so activations stay O(1) through 16 blocks.
    """
    g = torch.Generator().manual_seed(seed)
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    last = {id(getattr(b, "bn3", b.bn2)) for stage in stages for b in stage}
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                lo, hi = (0.2, 0.6) if id(mod) in last else (0.5, 1.0)
                mod.weight.copy_(torch.rand(n, generator=g) * (hi - lo) + lo)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                mod.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
        model.eval()
        x = torch.randn(2, 3, 32, 32, generator=g)
        pooled = model.forward_stages(x)["pooled"]
        w = torch.randn(model.fc.weight.shape, generator=g)
        model.fc.weight.copy_(w * 3 / (pooled @ w.T).std())
        model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=g))
    return model


def _torch_model(arch, stem="imagenet", seed=0):
    return _randomise(torch_resnet.build(arch, NUM_CLASSES, stem=stem), seed)


def _images(size, seed=1):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _flax_stages(arch, stem, variables, x_nchw):
    """Logits and the output of each stage's last block (NCHW) from the Flax model."""
    module = models.build(arch, NUM_CLASSES, stem=stem)
    x = jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))
    is_block = lambda mdl, method: method == "__call__" and (mdl.name or "").startswith("layer")
    logits, state = module.apply(
        variables, x, train=False, capture_intermediates=is_block, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    stages = {}
    for i in range(1, 5):
        last = max((k for k in inter if k.startswith(f"layer{i}_")), key=lambda k: int(k[7:]))
        stages[f"layer{i}"] = np.asarray(inter[last]["__call__"][0]).transpose(0, 3, 1, 2)
    return np.asarray(logits), stages


@pytest.mark.parametrize(
    "arch,stem,size",
    [
        ("resnet18", "imagenet", 64),
        ("resnet50", "imagenet", 64),
        ("resnet18", "cifar", 32),
        ("resnet_tiny", "cifar", 32),
    ],
)
def test_logits_and_stage_parity(arch, stem, size):
    model = _torch_model(arch, stem)
    x = _images(size)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model.forward_stages(x).items()}
    variables = torch_port.torch_to_flax(model.state_dict(), arch)
    logits, stages = _flax_stages(arch, stem, variables, x)
    assert 1.0 < np.abs(ref["logits"]).max() < 30.0  # non-trivial logits
    assert np.abs(logits - ref["logits"]).max() < 1e-4
    for name, act in stages.items():
        assert act.shape == ref[name].shape
        assert np.abs(act - ref[name]).max() < 1e-3, name


def _flax_variables(arch, stem, seed):
    """Random variables with the tree the Flax module declares (traced, not compiled)."""
    module = models.build(arch, NUM_CLASSES, stem=stem)
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    shapes = jax.eval_shape(init)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return rng.normal(0.0, (2.0 / fan_in) ** 0.5, shape).astype(np.float32)
        low, high = {"scale": (0.3, 0.8), "var": (0.5, 2.0)}.get(name, (-0.1, 0.1))
        return rng.uniform(low, high, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_flax_variables_run_in_torch(stem):
    """Flax-side variables, ported to torch, give the same logits there."""
    variables = _flax_variables("resnet_tiny", stem, seed=2)
    model = torch_resnet.build("resnet_tiny", NUM_CLASSES, stem=stem).eval()
    model.load_state_dict(torch_port.flax_to_torch(variables, "resnet_tiny"), strict=True)
    x = _images(32)
    with torch.no_grad():
        ref = model(x).numpy()
    logits, _ = _flax_stages("resnet_tiny", stem, variables, x)
    assert np.abs(ref).max() > 0.1
    assert np.abs(logits - ref).max() < 1e-4


def test_round_trip_torch_flax_torch_is_bitwise():
    model = _torch_model("resnet50")
    sd = model.state_dict()
    back = torch_port.flax_to_torch(torch_port.torch_to_flax(sd, "resnet50"), "resnet50",
                                    num_batches_tracked=7)  # fmt: skip
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        if key.endswith("num_batches_tracked"):
            assert int(back[key]) == 7
        else:
            assert torch.equal(back[key], value), key


def test_round_trip_flax_torch_flax_is_bitwise():
    variables = jax.tree.map(jnp.asarray, _flax_variables("resnet18", "cifar", seed=3))
    back = torch_port.torch_to_flax(torch_port.flax_to_torch(variables, "resnet18"), "resnet18")
    flat, tree = jax.tree.flatten(jax.tree.map(np.asarray, dict(variables)))
    flat_back, tree_back = jax.tree.flatten(back)
    assert tree == tree_back
    for a, b in zip(flat, flat_back, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_torchvision_layout():
    """Key counts and parameter counts of torchvision's ResNets (meta device: no memory)."""
    known = {"resnet18": (122, 11_689_512), "resnet34": (218, 21_797_672),
             "resnet50": (320, 25_557_032), "resnet101": (626, 44_549_160),
             "resnet152": (932, 60_192_808)}  # fmt: skip
    for arch, (n_keys, n_params) in known.items():
        shapes = torch_resnet.expected_shapes(arch, 1000)
        assert len(shapes) == n_keys
        params = [s for k, s in shapes.items() if k.endswith(("weight", "bias"))]
        assert sum(int(np.prod(s)) for s in params) == n_params, arch
    shapes = torch_resnet.expected_shapes("resnet50", 1000)
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert torch_resnet.resnet50().layer2[0].conv2.stride == (2, 2)


def test_wrapped_and_prefixed_checkpoints():
    sd = _torch_model("resnet_tiny").state_dict()
    ref = torch_port.torch_to_flax(sd, "resnet_tiny")
    wrapped = [
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        {"model": sd, "optimizer": {"lr": 0.1}},
    ]
    for ckpt in wrapped:
        got = torch_port.torch_to_flax(ckpt, "resnet_tiny")
        assert jax.tree.all(jax.tree.map(np.array_equal, got, ref))


def test_wrong_arch_lists_the_problems():
    with pytest.raises(PortError) as err:
        torch_port.torch_to_flax(torch_resnet.resnet18().state_dict(), "resnet50")
    msg = str(err.value)
    assert "does not fit resnet50" in msg and "missing keys (165)" in msg
    assert "layer1.0.conv3.weight" in msg and "wrong shapes" in msg
    assert "layer1.0.conv1.weight: got (64, 64, 3, 3), resnet50 needs (64, 64, 1, 1)" in msg
    assert "The keys match resnet18" in msg
    lightning = {
        "state_dict": {f"model.{k}": v for k, v in torch_resnet.resnet18().state_dict().items()}
    }
    with pytest.raises(PortError, match="Every key starts with 'model.': strip that prefix"):
        torch_port.torch_to_flax(lightning, "resnet18")
    with pytest.raises(PortError, match=r"(?s)unexpected keys \(\d+\):.*layer1\.2\.conv1"):
        torch_port.torch_to_flax(torch_resnet.resnet34().state_dict(), "resnet18")


def test_missing_extra_and_shape_in_one_error():
    sd = torch_resnet.resnet_tiny(NUM_CLASSES).state_dict()
    del sd["layer1.0.bn1.running_var"]
    sd["head.weight"] = torch.zeros(3)
    with pytest.raises(PortError) as err:
        torch_port.torch_to_flax(sd, "resnet_tiny", num_classes=5)
    msg = str(err.value)
    assert "missing keys (1):\n    layer1.0.bn1.running_var" in msg
    assert "unexpected keys (1):\n    head.weight" in msg
    assert "fc.weight: got (10, 64), resnet_tiny needs (5, 64)" in msg


def test_flax_to_torch_errors():
    variables = torch_port.torch_to_flax(torch_resnet.resnet_tiny().state_dict(), "resnet_tiny")
    del variables["params"]["layer2_0"]["downsample_conv"]
    variables["batch_stats"]["bn1"]["extra"] = np.zeros(8, np.float32)
    variables["params"]["layer1_0"]["conv1"]["kernel"] = np.zeros((3, 3, 8, 9), np.float32)
    variables["intermediates"] = {}
    with pytest.raises(PortError) as err:
        torch_port.flax_to_torch(variables, "resnet_tiny")
    msg = str(err.value)
    assert "params/layer2_0/downsample_conv/kernel" in msg
    assert "batch_stats/bn1/extra" in msg and "intermediates" in msg
    assert "params/layer1_0/conv1/kernel: got (3, 3, 8, 9)" in msg


class _Payload:
    """Unpickling this runs Path.touch: a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_code_running_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.pth"
    obj = {"conv1.weight": torch.zeros(1), "x": _Payload(marker)}
    if container == "torch_zip":
        torch.save(obj, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(obj, protocol=2))
        pickle.loads(ckpt.read_bytes())  # the payload is live: plain unpickling runs it
        assert marker.exists()
        marker.unlink()
    with pytest.raises(PortError, match="refused to load.*could run code") as err:
        torch_port.load_torch_file(ckpt)
    assert "Unsupported global" in str(err.value)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    import safetensors.torch

    sd = torch_resnet.resnet_tiny().state_dict()
    torch.save(sd, tmp_path / "w.pt")
    safetensors.torch.save_file(sd, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        got = torch_port.load_torch_file(tmp_path / name)
        assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(PortError, match="truncated"):
            torch_port.load_torch_file(tmp_path / f"cut_{name}")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        torch_port.load_torch_file(tmp_path / "absent.pt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
    with pytest.raises(PortError, match="not a state_dict of tensors"):
        torch_port.load_torch_file(tmp_path / "opt.pt")


def test_save_and_load_flax(tmp_path):
    variables = torch_port.torch_to_flax(_torch_model("resnet_tiny", "cifar").state_dict(),
                                         "resnet_tiny")  # fmt: skip
    out = torch_port.save_flax(variables, "resnet_tiny", tmp_path / "port", source="w.pt")
    loaded, meta = torch_port.load_flax(out)
    assert meta == {"format": torch_port.FORMAT, "arch": "resnet_tiny", "num_classes": 10,
                    "width": 8, "stem": "cifar", "source": "w.pt"}  # fmt: skip
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables))
    with pytest.raises(FileExistsError, match="not empty"):
        torch_port.save_flax(variables, "resnet_tiny", out)
    with pytest.raises(PortError, match="do not fit resnet18"):
        torch_port.save_flax(variables, "resnet18", tmp_path / "other")
    meta_text = (out / "meta.json").read_text()
    (out / "meta.json").write_text(meta_text.replace('"num_classes": 10', '"num_classes": 7'))
    with pytest.raises(PortError, match="meta.json disagrees"):
        torch_port.load_flax(out)
    data = (out / "variables.npz").read_bytes()
    (out / "variables.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PortError, match="corrupt"):
        torch_port.load_flax(out)


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages a process imported, from its PYTHONPROFILEIMPORTTIME lines."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_port_cli_then_train_from_the_ported_weights(data_dir, tmp_path):
    """`jaxrepro port` a torchvision-layout file, then `jaxrepro train --config.init_from`:
    the run starts from the ported weights bit for bit, trains, and never imports torch."""
    from helpers import TINY_FLAGS
    from test_cli_errors import cli

    from jaxrepro.checkpoints import Checkpoints
    from jaxrepro.plumbing import hashing
    from jaxrepro.workdir import Workdir

    model = _randomise(torch_resnet.build("resnet_tiny", NUM_CLASSES, stem="cifar"), 3)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    want = torch_port.torch_to_flax(model.state_dict(), "resnet_tiny")  # computed here
    # Imports listed on stderr; the session's compile cache (programs the in-process
    # tests of the same tiny config compiled already).
    env = {
        "PYTHONPROFILEIMPORTTIME": "1",
        "JAXREPRO_COMPILE_CACHE": "1",
        "JAXREPRO_COMPILE_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    }
    port = tmp_path / "ported"
    r = cli("port", "--arch=resnet_tiny", f"--torch={tmp_path / 'tiny.pt'}", f"--out={port}",
            env_extra=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch" in _imported(r.stderr)  # the port needs torch (and the check sees it)
    workdir = tmp_path / "run"
    r = cli("train", *TINY_FLAGS, f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
            f"--config.init_from={port}", "--config.pretrain.steps=2", "--config.finetune.steps=0",
            env_extra=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    imported = _imported(r.stderr)
    assert "jaxrepro" in imported and "torch" not in imported
    info = Workdir(str(workdir)).read_run()
    assert info["status"] == "done" and info["step"] == 2
    ckpts = Checkpoints(str(workdir / "checkpoints"), read_only=True)
    try:
        assert ckpts.steps() == [0, 2]
        start, end = ckpts.arrays(0), ckpts.arrays(2)
    finally:
        ckpts.close()
    # Every ported array, the head included (10 classes, as the config's pretrain data):
    # load_pretrained keeps the model's own head only when the shapes differ.
    for collection in ("params", "batch_stats"):
        for path, value in torch_port._flatten(want[collection]).items():
            key = "/".join((collection, *path))
            assert start[key].dtype == value.dtype and start[key].tobytes() == value.tobytes(), key
    assert info["init_param_hash"] == hashing.tree_hash(want["params"])
    # it trained from there: every parameter array moved, the losses are finite
    moved = [k for k in start if k.startswith("params/") and not np.array_equal(start[k], end[k])]
    assert len(moved) == len(torch_port._flatten(want["params"]))
    losses = [row["loss"] for row in Workdir(str(workdir)).metrics() if row["kind"] == "train"]
    assert len(losses) == 2 and np.all(np.isfinite(losses))


def test_init_from_keeps_the_models_head_for_another_label_set(data_dir, tmp_path):
    from helpers import tiny_digits

    from jaxrepro import ported
    from jaxrepro.train import state as state_lib

    model = _randomise(torch_resnet.build("resnet_tiny", 7, stem="cifar"), 4)
    want = torch_port.torch_to_flax(model.state_dict(), "resnet_tiny")
    ported.write(want, "resnet_tiny", tmp_path / "p7")
    config = tiny_digits(data_dir, init_from=str(tmp_path / "p7"))
    module = state_lib.build_module(config, 10, "lax")
    params, stats = models.init_variables(module, jax.random.key(0), 16)
    got, got_stats = state_lib.load_pretrained(config, params, stats)
    assert np.array_equal(got["fc"]["kernel"], params["fc"]["kernel"])  # the model's own head
    assert np.array_equal(got["fc"]["bias"], params["fc"]["bias"])
    for path, value in torch_port._flatten(want["params"]).items():
        if path[0] != "fc":
            node = got
            for k in path:
                node = node[k]
            assert np.asarray(node).tobytes() == value.tobytes(), path
    stats_want = want["batch_stats"]["bn1"]["var"]
    assert np.asarray(got_stats["bn1"]["var"]).tobytes() == stats_want.tobytes()
