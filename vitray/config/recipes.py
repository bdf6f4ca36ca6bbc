"""The paper's recipes as named configs. Read these next to the ViT paper's Tables 1 and 3 (App. B.1).

`pretrain("vit_h14", "jft")` is Table 3's ViT-H/14 row: Adam β=(0.9, 0.999), batch 4096, 10k warmup steps,
linear decay, weight decay 0.1, dropout 0, gradient clip 1, base LR 3e-4, 14 epochs of JFT-300M.
"""
from __future__ import annotations

from vitray.config.schema import Config, ConfigError

# Pretraining datasets: classes, images, and the per-dataset regularisation of Table 3.
DATASETS = {
    "jft": dict(num_classes=18291, num_images=303_000_000, weight_decay=0.1, dropout=0.0, schedule="linear"),
    "i21k": dict(num_classes=21843, num_images=14_197_122, weight_decay=0.03, dropout=0.1, schedule="linear"),
    "imagenet": dict(num_classes=1000, num_images=1_281_167, weight_decay=0.3, dropout=0.1, schedule="cosine"),
}

# Table 3: (model, dataset) → (epochs, base LR).
PRETRAIN_TABLE = {
    ("vit_b32", "jft"): (7, 8e-4),
    ("vit_b16", "jft"): (7, 8e-4),
    ("vit_l32", "jft"): (7, 6e-4),
    ("vit_l16", "jft"): (7, 4e-4),  # also run for 14 epochs: pretrain(..., epochs=14)
    ("vit_h14", "jft"): (14, 3e-4),
    # The CNN baselines and hybrids, same optimiser (the paper trains ResNets with Adam too, Sec. 4.1).
    ("bit_r50x1", "jft"): (7, 1e-3),
    ("bit_r50x2", "jft"): (7, 1e-3),
    ("bit_r101x1", "jft"): (7, 8e-4),
    ("bit_r152x1", "jft"): (7, 6e-4),
    ("bit_r152x2", "jft"): (7, 6e-4),  # also 14 epochs (Table 6)
    ("bit_r200x3", "jft"): (14, 6e-4),  # Table 3 gives no LR for R200x3: that of the next-deepest, R152
    ("r50_vit_b32", "jft"): (7, 8e-4),
    ("r50_vit_b16", "jft"): (7, 8e-4),
    ("r50_vit_l32", "jft"): (7, 2e-4),
    ("r50_vit_l16", "jft"): (7, 4e-4),  # also 14 epochs (Table 6)
    ("vit_b32", "i21k"): (90, 1e-3),
    ("vit_b16", "i21k"): (90, 1e-3),
    ("vit_l32", "i21k"): (30, 1e-3),
    ("vit_l16", "i21k"): (30, 1e-3),  # 30 or 90 epochs
    ("vit_b32", "imagenet"): (300, 3e-3),
    ("vit_b16", "imagenet"): (300, 3e-3),
    ("vit_l32", "imagenet"): (300, 3e-3),
    ("vit_l16", "imagenet"): (300, 3e-3),
}


def pretrain(model: str, dataset: str = "jft", epochs: float | None = None) -> Config:
    """A Table 3 pretraining recipe. Data URIs stay empty: the user names their shards."""
    from vitray.models.registry import canonical, get_spec

    name = canonical(model)
    if (name, dataset) not in PRETRAIN_TABLE:
        raise ConfigError(f"{model} on {dataset}: not a row of the paper's Table 3 ({sorted(PRETRAIN_TABLE)})")
    table_epochs, lr = PRETRAIN_TABLE[(name, dataset)]
    ds = DATASETS[dataset]
    return Config().replace(
        # BiT has no pre-logits layer (nor does Table 6 count one for it).
        model=dict(name=name, num_classes=ds["num_classes"], dropout=ds["dropout"],
                   pre_logits=get_spec(name).has_pre_logits_default),
        data=dict(image_size=224),
        optim=dict(
            optimizer="adam", lr=lr, betas=(0.9, 0.999), weight_decay=ds["weight_decay"], schedule=ds["schedule"],
            warmup_steps=10_000, grad_clip=1.0, global_batch=4096, epochs=epochs or table_epochs,
        ),
        # ZeRO-1 shards Adam's moments (12Ψ of the 16Ψ bytes per parameter) at DDP's communication volume.
        deepspeed=dict(zero_stage=1, precision="auto"),
        # 64 GPUs × micro-batch 32 × accumulation 2 = 4096.
        scaling=dict(num_workers=64, use_gpu=True, cpus_per_worker=8),
        storage=dict(checkpoint_every=1000, keep_checkpoints=3),
        # Weeks on 64+ accelerators lose nodes (the plan says how many to expect): restart from the last checkpoint.
        max_failures=10,
    )


def smoke() -> Config:
    """A few CPU minutes end to end: a tiny ViT on scikit-learn's real digits, streamed from the embedded S3,
    2 Train workers under DeepSpeed ZeRO-2. Same code path as the paper recipes; only the sizes shrink."""
    return Config().replace(
        model=dict(name="vit_smoke", num_classes=10, dropout=0.0, pre_logits=True),
        # Digits are not mirror-symmetric (flips cost points), and an 8×8 image survives only mild crops. Crops of
        # 70–100 % of the area, not 90–100 %: the shifts teach the position embeddings 2-D locality (the paper's
        # Figure 7; neighbour-vs-distant cosine margin 0.43–0.46 over 2 seeds against 0.14–0.15 at 90 %, ~0 at
        # initialisation) at the same held-out accuracy (0.98–0.99 against 0.97–0.98), and the fine-tuning
        # recipe's 2-D interpolation of the embeddings assumes exactly that smoothness.
        data=dict(builtin="digits", image_size=16, crop_area_min=0.7, flip=False, shuffle_buffer=512),
        # Fewer warmup steps and a higher LR than Table 3: the run is ~1,400 steps, not ~1M. 60 epochs because 25
        # left the fine-tuning chain at 0.95–0.97 held-out and 60 at 0.98–0.99 (measured over 5 seeds).
        optim=dict(
            optimizer="adam", lr=4e-3, weight_decay=0.05, schedule="cosine", warmup_steps=40,
            global_batch=64, micro_batch=32, epochs=60, grad_clip=1.0,
        ),
        deepspeed=dict(zero_stage=2, precision="fp32"),
        # Half a CPU per worker leaves the rest of a 2-core laptop to Ray Data's decode tasks.
        scaling=dict(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
        storage=dict(checkpoint_every=0, keep_checkpoints=2),
        log_every=25,
    )


# Table 4 (fine-tuning): dataset → (classes, steps, LR grid). SGD momentum 0.9, no weight decay, batch 512, clip 1,
# cosine decay; resolution 384 (Table 2's ImageNet runs: L/16 at 512, H/14 at 518 = 37 × 14).
FINETUNE_TABLE = {
    "imagenet": (1000, 20_000, (0.003, 0.01, 0.03, 0.06)),
    "cifar10": (10, 10_000, (0.001, 0.003, 0.01, 0.03)),
    "cifar100": (100, 10_000, (0.001, 0.003, 0.01, 0.03)),
    "pets": (37, 500, (0.001, 0.003, 0.01, 0.03)),
    "flowers": (102, 500, (0.001, 0.003, 0.01, 0.03)),
    "vtab": (0, 2_500, (0.01,)),  # 19 tasks, each with its own classes: set model.num_classes
}


def finetune(model: str, dataset: str, lr: float | None = None) -> Config:
    """A Table 4 fine-tuning recipe (the first LR of the grid unless `lr` is given). Point transfer.init_from at a
    pretraining checkpoint or a released .npz, and data.train_uri / data.val_uri at the target dataset."""
    from vitray.models.registry import canonical, get_spec

    name = canonical(model)
    if dataset not in FINETUNE_TABLE:
        raise ConfigError(f"{dataset}: not a dataset of the paper's Table 4 ({', '.join(FINETUNE_TABLE)})")
    classes, steps, grid = FINETUNE_TABLE[dataset]
    resolution = {"vit_l16": 512, "vit_h14": 518}.get(name, 384) if dataset == "imagenet" else 384
    if resolution % get_spec(name).size_multiple:
        # 384 is no multiple of 14: the official VALID-padded patch conv sees 27 × 27 patches, i.e. 378 px of it.
        resolution -= resolution % get_spec(name).size_multiple
    return Config().replace(
        model=dict(name=name, num_classes=classes or 1000, dropout=0.0, pre_logits=False),
        data=dict(image_size=resolution),
        optim=dict(optimizer="sgd", lr=lr or grid[0], momentum=0.9, weight_decay=0.0, schedule="cosine",
                   warmup_steps=100 if dataset in ("pets", "flowers") else 500, grad_clip=1.0, global_batch=512,
                   micro_batch=8, total_steps=steps),
        deepspeed=dict(zero_stage=1, precision="auto"),
        scaling=dict(num_workers=64, use_gpu=True, cpus_per_worker=8),
        transfer=dict(posemb_method="bilinear", ema_decay=0.9999 if dataset == "imagenet" else 0.0),
        storage=dict(checkpoint_every=1000),
    )


def finetune_smoke() -> Config:
    """Fine-tune the smoke pretraining checkpoint on the digits at a larger size (16 → 24 px: 4×4 → 6×6 patches),
    with the paper's SGD recipe scaled down and weight averaging on."""
    return smoke().replace(
        model=dict(pre_logits=False),
        data=dict(image_size=24),
        optim=dict(optimizer="sgd", lr=0.03, momentum=0.9, weight_decay=0.0, schedule="cosine", warmup_steps=20,
                   global_batch=64, micro_batch=32, epochs=20, grad_clip=1.0),
        transfer=dict(posemb_method="bilinear", ema_decay=0.99),
    )


# DETR (Carion et al. 2020, Sec. 4 and App. A): AdamW at 1e-4 (backbone 1e-5), weight decay 1e-4, gradient clip 0.1,
# 4 images on each of 16 GPUs, 300 epochs with the LR dropped tenfold after 200 (the 500-epoch schedule drops after
# 400), dropout 0.1, aux losses. vitray feeds fixed-size square images (the paper: shorter side 480–800, longer
# ≤ 1333, padded with masks); 800 px squares keep COCO objects at the paper's scale.
COCO_IMAGES = 118_287


def detr(model: str = "detr_r50", epochs: int = 300) -> Config:
    return Config().replace(
        model=dict(name=model, num_classes=91, dropout=0.1, pre_logits=False),  # COCO's category ids run to 90
        data=dict(image_size=800, flip=True, shuffle_buffer=2_000),
        optim=dict(optimizer="adam", lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, schedule="step",
                   lr_drop=(400 if epochs == 500 else 200) / epochs, warmup_steps=0, grad_clip=0.1, global_batch=64,
                   micro_batch=4, epochs=epochs),
        detection=dict(max_boxes=100, backbone_lr_scale=0.1, crop_min=0.6),
        deepspeed=dict(zero_stage=1, precision="auto"),
        scaling=dict(num_workers=16, use_gpu=True, cpus_per_worker=8),
        storage=dict(checkpoint_every=2000, keep_checkpoints=3),
    )


def detr_smoke() -> Config:
    """DETR on digit canvases on a 2-core laptop: the tiny DETR (two ResNet stages, 2 + 2 layers, 10 queries) on
    64 px canvases of 1–3 real digits, embedded S3, 2 CPU workers. The paper's recipe, scaled down."""
    return detr("detr_smoke").replace(
        model=dict(num_classes=10, dropout=0.0),
        data=dict(builtin="digit_canvases", image_size=64, flip=False, shuffle_buffer=500),
        optim=dict(lr=5e-4, global_batch=32, micro_batch=16, epochs=20, lr_drop=2 / 3),
        detection=dict(max_boxes=10, backbone_lr_scale=1.0, crop_min=0.8),
        deepspeed=dict(zero_stage=2, precision="fp32"),
        scaling=dict(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
        storage=dict(checkpoint_every=0, keep_checkpoints=2),
        log_every=50,
    )


def detr_backbone_smoke() -> Config:
    """The smoke DETR's backbone pretraining (the paper starts from an ImageNet classifier): the same small BiT
    ResNet classifying the digits at 24 px, the size the canvases show them at. Under a minute on 2 cores."""
    return smoke().replace(model=dict(name="bit_smoke_s", pre_logits=False), data=dict(image_size=24),
                           optim=dict(epochs=8, warmup_steps=20), log_every=50)


DETR_PRESETS = {"smoke": detr_smoke, "r50_coco": detr, "r50_coco_500ep": lambda: detr(epochs=500),
                "r101_coco": lambda: detr("detr_r101")}

# iGPT (Chen et al. 2020, Sec. 3.4): ImageNet at 32×32 through a 512-colour palette (sequences of 1024 tokens), no
# labels; Adam with β2 = 0.95, no dropout, no weight decay, batch 128 for 1M iterations, the LR warmed up for one
# epoch then cosine to zero. The paper picks each model's LR from a sweep (0.01, 0.003, 0.001, ...) without
# listing the winners: vitray starts from 0.003 for S and 0.001 for M and L. BERT variants: the same recipe.
IMAGENET_IMAGES = 1_281_167


def igpt(model: str = "igpt_l", lr: float = 1e-3, workers: int = 8) -> Config:
    """`workers` GPUs share the batch of 128: iGPT-L's activations at 1024 tokens need micro-batches of 8 (16
    workers) to fit 80 GB (the planner's estimate: ~96 GiB per device at 16)."""
    return Config().replace(
        model=dict(name=model, num_classes=1000, dropout=0.0, pre_logits=False),  # labels only for the probes
        data=dict(image_size=32, crop_area_min=1.0, flip=False, shuffle_buffer=10_000),
        optim=dict(optimizer="adam", lr=lr, betas=(0.9, 0.95), weight_decay=0.0, schedule="cosine",
                   warmup_steps=IMAGENET_IMAGES // 128, global_batch=128, micro_batch=128 // workers,
                   total_steps=1_000_000),
        deepspeed=dict(zero_stage=2, precision="auto"),
        scaling=dict(num_workers=workers, use_gpu=True, cpus_per_worker=8),
        storage=dict(checkpoint_every=10_000, keep_checkpoints=3),
    )


def igpt_smoke() -> Config:
    """iGPT on a 2-core laptop: the tiny image GPT (4 layers, width 64) on the 8×8 digits with a 16-colour palette
    (sequences of 64 tokens), labels unused, embedded S3, 2 CPU workers."""
    return smoke().replace(
        model=dict(name="igpt_smoke", num_classes=10, dropout=0.0, pre_logits=False),
        data=dict(image_size=8, crop_area_min=1.0, flip=False),
        optim=dict(lr=3e-3, weight_decay=0.01, warmup_steps=20, epochs=20),
    )


IGPT_PRESETS = {
    "s_imagenet32": lambda: igpt("igpt_s", lr=3e-3),
    "m_imagenet32": lambda: igpt("igpt_m"),
    "l_imagenet32": lambda: igpt("igpt_l", workers=16),
    **{f"{size}_imagenet32_bert": (lambda size=size, lr=lr, workers=workers: igpt(f"igpt_{size}_bert", lr, workers))
       for size, lr, workers in (("s", 3e-3, 8), ("m", 1e-3, 8), ("l", 1e-3, 16))},
    "smoke": igpt_smoke,
    "smoke_bert": lambda: igpt_smoke().replace(model=dict(name="igpt_smoke_bert")),
}

PRESETS = {
    "h14_jft": lambda: pretrain("vit_h14", "jft"),
    "l16_jft": lambda: pretrain("vit_l16", "jft"),
    "l16_jft_14ep": lambda: pretrain("vit_l16", "jft", epochs=14),
    "b16_jft": lambda: pretrain("vit_b16", "jft"),
    "b32_jft": lambda: pretrain("vit_b32", "jft"),
    "l16_i21k": lambda: pretrain("vit_l16", "i21k"),
    "b16_i21k": lambda: pretrain("vit_b16", "i21k"),
    "b16_imagenet": lambda: pretrain("vit_b16", "imagenet"),
    "smoke": smoke,
}

FINETUNE_PRESETS = {
    **{f"{m}_{d}": (lambda m=m, d=d: finetune(m, d)) for m in ("b16", "l16", "h14") for d in FINETUNE_TABLE},
    "smoke": finetune_smoke,
}


# Every job's presets, by the job's script (jobs/<name>.py); `find_preset` looks a name up in this order (so "smoke"
# is pretraining's).
JOB_PRESETS = {"pretrain_vit_h14": PRESETS, "finetune": FINETUNE_PRESETS, "train_detr": DETR_PRESETS,
               "pretrain_igpt": IGPT_PRESETS}

# Training images of each dataset a preset names (the last part of its name that is one of these): what the planner
# turns epochs into steps with. Table 4's fine-tuning sets as the paper trains on them (VTAB: the 1k examples).
TRAIN_IMAGES = {**{name: d["num_images"] for name, d in DATASETS.items()}, "cifar10": 50_000, "cifar100": 50_000,
                "pets": 3_680, "flowers": 1_020, "vtab": 1_000, "coco": 118_287, "imagenet32": 1_281_167}


def find_preset(name: str) -> tuple[str, Config]:
    """(job, config) of any job's preset: `NAME` (the first job in JOB_PRESETS that has it) or `JOB:NAME`."""
    job, _, short = name.rpartition(":")
    tables = {job: JOB_PRESETS[job]} if job in JOB_PRESETS else JOB_PRESETS
    for found, table in tables.items():
        if short in table and (not job or job == found):
            return found, table[short]()
    known = ", ".join(f"{j}:{n}" for j, t in JOB_PRESETS.items() for n in t)
    raise ConfigError(f"--preset: unknown preset {name!r} (known: {known})")


def train_images(preset_name: str) -> int | None:
    """The training images of the dataset a preset's name names, or None (the smoke presets: give --images)."""
    parts = preset_name.rpartition(":")[2].split("_")
    return next((TRAIN_IMAGES[p] for p in reversed(parts) if p in TRAIN_IMAGES), None)


def preset(name: str, table: dict | None = None) -> Config:
    table = PRESETS if table is None else table
    if name not in table:
        raise ConfigError(f"--preset: unknown preset {name!r} (known: {', '.join(table)})")
    return table[name]()
