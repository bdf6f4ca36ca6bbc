"""Every registered model, as timm tests its zoo: at full size on PyTorch's meta device (builds, takes its input,
gives the output its task expects, without allocating a byte), and for real on each family's smallest model
through the task interface the training loop uses (loss, backward, state round trip, layer features, fine-tune
adaptation). A model added to the registry is covered without touching this file."""
import numpy as np
import pytest
import torch

from vitray.config import smoke
from vitray.config.recipes import DETR_PRESETS, IGPT_PRESETS
from vitray.models.registry import MODELS, build_model, get_spec
from vitray.tasks import make_task

FAMILIES = sorted({spec.family for spec in MODELS.values()})


def _size(name: str) -> int:
    spec = get_spec(name)
    return {"detr": 64, "igpt": 8}.get(spec.family, 2 * getattr(spec, "patch", 16))


def _params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, num_classes=10, image_size=_size(name)).parameters())


SMALLEST = {f: min((n for n in MODELS if get_spec(n).family == f), key=_params) for f in FAMILIES}


def _config(name: str):
    family = get_spec(name).family
    base = {"detr": DETR_PRESETS["smoke"], "igpt": IGPT_PRESETS["smoke"]}.get(family, smoke)()
    return base.replace(model=dict(name=name, num_classes=10), data=dict(image_size=_size(name)))


def _batch(task, size: int, n: int = 2) -> dict:
    rng = np.random.default_rng(0)
    batch = {k: np.repeat(v, n, axis=0) for k, v in task.empty_batch().items()}
    batch["image"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    if "label" in batch:
        batch["label"] = rng.integers(0, 10, n)
    if "num_boxes" in batch:  # one real box per image
        batch["num_boxes"][:] = 1
        batch["boxes"][:, 0] = [0.5, 0.5, 0.3, 0.4]
        batch["labels"][:, 0] = [1, 7][:n]
    return batch


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_runs_at_full_size_on_meta(name):
    family = get_spec(name).family
    size = {"detr": 800, "igpt": 32}.get(family, 224)
    with torch.device("meta"):
        model = build_model(name, num_classes=1000, image_size=size)
        out = model(torch.empty(2, 3, size, size))
    assert sum(p.numel() for p in model.parameters()) > 0
    if family == "detr":
        assert out["logits"].shape == (2, model.spec.queries, 1001) and out["boxes"].shape == (2, model.spec.queries, 4)
    elif family == "igpt":
        assert out.shape[0] == 2 and out.shape[-1] == model.spec.vocab
    else:
        assert out.shape == (2, 1000)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_round_trips_and_adapts_through_its_task(family):
    name = SMALLEST[family]
    cfg = _config(name)
    torch.manual_seed(0)
    task = make_task(cfg)
    model = task.build_model()
    if family == "igpt":  # the palette the driver would fit: 16 fixed colours
        model.set_palette(torch.linspace(-1, 1, model.spec.vocab)[:, None].repeat(1, 3))
    batch = task.to_tensors(_batch(task, cfg.data.image_size), torch.device("cpu"), torch.float32)
    assert batch["image"].dtype == torch.float32 and -1 <= batch["image"].min() and batch["image"].max() <= 1

    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    # The state round trip the checkpoints rely on: a fresh model with the saved state computes the same.
    model.eval()
    again = task.build_model().eval()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(batch["image"]), again(batch["image"])
    for x, y in zip(*(([v] if torch.is_tensor(v) else [v["logits"], v["boxes"]]) for v in (a, b))):
        torch.testing.assert_close(x, y)

    if hasattr(model, "layer_features"):  # the probes' features: one (B, D) per asked layer
        layers = [0, model.spec.depth]
        feats = model.layer_features(batch["image"], layers)
        assert len(feats) == 2 and all(f.ndim == 2 and f.shape[0] == 2 for f in feats)
    if hasattr(model, "adapt_for_finetuning"):  # the transfer recipe: new zero head, a larger resolution
        bigger = cfg.data.image_size * 2
        tuned = model.adapt_for_finetuning(3, bigger)
        with torch.no_grad():
            logits = tuned(torch.zeros(1, 3, bigger, bigger))
        assert logits.shape == (1, 3) and torch.count_nonzero(logits) == 0


@pytest.fixture(scope="module")
def zero_init_builds():
    """Each family's smallest model built on 2 ranks under ZeRO-3's zero.Init and plainly (tests/zero_init_probe.py)."""
    import json
    import os
    import subprocess
    import sys

    from vitray.storage import free_port

    probe = os.path.join(os.path.dirname(__file__), "zero_init_probe.py")
    done = subprocess.run([sys.executable, probe, str(free_port()), *SMALLEST.values()], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_builds_partitioned_under_zero3_with_the_same_weights(family, zero_init_builds):
    """No rank holds the whole model while it is built (half of it each, on 2 ranks), and the gathered weights are
    the plain build's, bit for bit: an init that wrote into a partitioned placeholder would leave torch's default."""
    built = zero_init_builds[SMALLEST[family]]
    assert built["differ"] == [], f"{SMALLEST[family]}: initialised differently under zero.Init: {built['differ']}"
    assert built["held"] <= built["params"] / 2 + 1024
