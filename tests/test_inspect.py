"""Model inspection (paper Figure 7, attention rollout): the analyses against hand-computed cases, the job on the
smoke pretraining checkpoint in S3. (A ResNet checkpoint's refusal is tested on the real BiT run of test_train.)"""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vitray import storage
from vitray.eval import inspect, plots
from vitray.models.registry import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rollout_rows_are_distributions_and_match_a_hand_computed_two_layer_case():
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    layer1 = torch.stack([torch.eye(2), swap])[None]  # (B=1, heads=2, N=2, N=2): heads average to 0.5 everywhere
    layer2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(1, 2, 2, 2)  # both heads: every token reads token 1
    # By hand: A1 = rownorm(0.5 + I) = [[.75, .25], [.25, .75]], A2 = rownorm([[1, 1], [0, 2]]) = [[.5, .5], [0, 1]],
    # rollout = A2 · A1 = [[.5, .5], [.25, .75]].
    expected = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    assert torch.allclose(inspect.rollout([layer1, layer2])[0], expected)

    maps = [torch.rand(3, 4, 5, 5).softmax(-1) for _ in range(6)]
    r = inspect.rollout(maps)
    assert r.shape == (3, 5, 5) and torch.allclose(r.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    cls = inspect.cls_rollout_maps(maps, (2, 2))
    assert cls.shape == (3, 2, 2) and np.allclose(cls.max(axis=(1, 2)), 1.0)


def test_mean_attention_distance_is_zero_for_self_and_the_analytic_mean_for_uniform():
    n = 2 * 2 + 1  # 2×2 patches + the class token
    self_attention = torch.eye(n).expand(3, 2, 4, n, n)  # (layers, images, heads, N, N)
    assert np.allclose(inspect.mean_attention_distance(self_attention, (2, 2), patch=4), 0.0)
    uniform = torch.full((3, 2, 4, n, n), 1.0 / n)
    # Each patch: itself (0), two side neighbours (4 px), the diagonal one (4√2 px), equally weighted.
    d = inspect.mean_attention_distance(uniform, (2, 2), patch=4)
    assert d.shape == (3, 4) and np.allclose(d, (0 + 4 + 4 + 4 * math.sqrt(2)) / 4)
    # A non-square 1×3 strip: row means 1, 2/3, 1 patch → 8/9 of a patch on average.
    strip = [torch.full((1, 1, 4, 4), 0.25)]
    assert np.allclose(inspect.mean_attention_distance(strip, (1, 3), patch=1), 8 / 9)


def test_pca_filters_reconstruct_the_patch_embedding():
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", num_classes=10, image_size=16)  # 32 filters of 3·8·8 = 192 values
    pca = inspect.embedding_filters(model)
    weights = model.patch_embed.weight.detach().double().numpy().reshape(32, -1)
    assert np.allclose(pca.reconstruct(), weights, atol=1e-10)
    errors = [np.linalg.norm(pca.reconstruct(k) - weights) for k in (1, 4, 16, 32)]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] + 1e-3
    assert np.allclose(pca.components @ pca.components.T, np.eye(len(pca.components)), atol=1e-10)
    ratio = pca.explained_variance_ratio
    assert ratio.sum() == pytest.approx(1.0) and np.all(np.diff(ratio) <= 1e-12)
    assert pca.images(28).shape == (28, 8, 8, 3)


def test_attention_is_explicit_while_training_stays_fused():
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", num_classes=10, image_size=(16, 24)).eval()  # a 2×3 grid
    images = torch.randn(2, 3, 16, 24)
    maps = inspect.attention_weights(model, images)
    assert len(maps) == 2 and all(m.shape == (2, 2, 7, 7) for m in maps)
    with torch.no_grad():  # the fused path computes the same outputs without materialising weights
        assert torch.allclose(model(images), model(images, return_attention=True)[0], atol=1e-5)
    sim = inspect.posemb_similarity(model)
    assert sim.shape == (2, 3, 2, 3) and np.allclose([sim[r, c, r, c] for r in range(2) for c in range(3)], 1.0)


def _png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.verify()
    return img.size


def test_smoke_checkpoint_position_embeddings_learned_2d_locality(s3, smoke_chain):
    """Neighbouring patches' position embeddings end up more similar than distant ones' (Figure 7, centre) — a
    property of training: at initialisation the margin is noise around zero."""
    model, meta = inspect.load_for_inspection(smoke_chain["pretrain"]["checkpoint"], s3.endpoint)
    assert meta["grid"] == [4, 4] and meta["model"] == "vit_smoke"
    trained = inspect.locality(inspect.posemb_similarity(model))
    initial = []
    for seed in range(5):
        torch.manual_seed(seed)
        initial.append(inspect.locality(inspect.posemb_similarity(build_model("vit_smoke", num_classes=10, image_size=16)))["margin"])
    # Measured: 0.43–0.46 trained (two seeds of the recipe), |margin| ≤ 0.05 at initialisation.
    assert trained["margin"] > 0.25 and max(abs(m) for m in initial) < 0.12, (trained, initial)


def test_inspect_job_writes_every_figure_and_its_numbers_to_s3(s3, digits, smoke_chain):
    out = f"s3://{s3.bucket}/inspect/smoke"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "inspect_vit.py"), "--checkpoint", smoke_chain["pretrain"]["checkpoint"],
         "--images", digits["val"], "--endpoint-url", s3.endpoint.url, "--out", out, "--num-images", "12",
         "--rollout-images", "5"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads(storage.read_bytes(f"{out}/inspection.json", s3.endpoint))
    expected = {"filters.png": plots.SIZES["filters"], "posemb_similarity.png": plots.SIZES["posemb_similarity"],
                "attention_distance.png": plots.SIZES["attention_distance"],
                "attention_rollout.png": plots.rollout_size(5)}
    assert set(summary["figures"]) == set(expected) == set(report["figures"])
    for name, size in expected.items():
        assert _png_size(storage.read_bytes(f"{out}/{name}", s3.endpoint)) == size, name
    assert report["images"] == 12 and len(report["rollout"]["images"]) == 5
    distance = np.array(report["attention_distance"]["per_layer_head"])
    assert distance.shape == (4, 4) and np.all((distance > 0) & (distance < 16 * math.sqrt(2)))
    rollout = np.array(report["rollout"]["cls_to_patches"])
    assert rollout.shape == (5, 4, 4) and np.allclose(rollout.max(axis=(1, 2)), 1.0)
    assert len(report["filters"]["explained_variance_ratio"]) == 28
    assert report["posemb"]["margin"] == pytest.approx(summary["posemb_locality_margin"])


def test_npz_checkpoints_are_inspected_and_bad_input_is_named(tmp_path):
    from vitray.models.npz import save_npz

    torch.manual_seed(0)
    model = build_model("vit_tiny_test", num_classes=10, image_size=16)
    (tmp_path / "tiny.npz").write_bytes(save_npz(model))
    loaded, meta = inspect.load_for_inspection(str(tmp_path / "tiny.npz"))
    assert meta["grid"] == [2, 2] and meta["depth"] == 2 and meta["heads"] == 2
    assert torch.equal(loaded.pos_embed, model.pos_embed) and torch.equal(loaded.patch_embed.weight, model.patch_embed.weight)

    (tmp_path / "resnet.npz").write_bytes(b"")
    np.savez(tmp_path / "resnet.npz", **{"resnet/root_block/standardized_conv2d/kernel": np.zeros((7, 7, 3, 64))})
    with pytest.raises(inspect.InspectionError, match="not a ViT .npz"):
        inspect.load_for_inspection(str(tmp_path / "resnet.npz"))
    with pytest.raises(inspect.InspectionError, match=r"--images: .*missing.* does not exist"):
        inspect.load_images(str(tmp_path / "missing"), None, 4, (16, 16))
    images, names = inspect.load_images(None, None, 3, (16, 16))  # default: the held-out digits
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and len(names) == 3
    with pytest.raises(inspect.InspectionError, match="the model takes 16×16"):
        inspect.inspect(loaded, np.zeros((1, 24, 24, 3), np.uint8), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written
