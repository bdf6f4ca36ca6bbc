"""The inspection figures as PNG bytes (matplotlib, no display needed). Every figure has a fixed size in pixels
(`SIZES`, or `rollout_size` for the overlay grid), so a report looks the same for ViT-Ti/16 and ViT-H/14."""
from __future__ import annotations

import io
import math

import numpy as np

DPI = 100
SIZES = {"filters": (700, 460), "posemb_similarity": (800, 800), "attention_distance": (640, 480)}
ROLLOUT_CELL = 160  # pixels per image in the overlay grid


def rollout_size(images: int) -> tuple[int, int]:
    """(width, height) of the rollout figure: one column per image, the input above its overlay."""
    return ROLLOUT_CELL * images, 2 * ROLLOUT_CELL


def _figure(size: tuple[int, int]):
    import matplotlib

    matplotlib.use("Agg")  # cluster nodes have no display
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": it would change the size
    plt.close(fig)
    return buf.getvalue()


def filters(patches: np.ndarray) -> bytes:
    """Principal components (n, P, P, 3) as RGB patches, 7 per row like the paper's Figure 7; each component is
    scaled to [0, 1] on its own (a component's sign and scale carry no meaning)."""
    plt, fig = _figure(SIZES["filters"])
    cols = 7
    rows = max(1, math.ceil(len(patches) / cols))
    fig.suptitle("RGB embedding filters (first principal components)", fontsize=10)
    for i, p in enumerate(patches):
        ax = fig.add_subplot(rows, cols, i + 1)
        lo, hi = p.min(), p.max()
        ax.imshow((p - lo) / (hi - lo) if hi > lo else np.zeros_like(p), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(plt, fig)


def posemb_similarity(similarity: np.ndarray) -> bytes:
    """(gh, gw, gh, gw) cosine similarities as a gh × gw grid of small heat maps: the tile at (row, col) shows how
    similar that patch's position embedding is to every other patch's (paper Figure 7, centre). Drawn as one mosaic
    image with gaps, so a 37 × 37 grid (ViT-H/14 at 518 px) renders as fast as a 4 × 4 one."""
    gh, gw = similarity.shape[:2]
    mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)  # one blank row/column between tiles
    for r in range(gh):
        for c in range(gw):
            mosaic[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = similarity[r, c]
    plt, fig = _figure(SIZES["posemb_similarity"])
    ax = fig.add_axes([0.09, 0.08, 0.74, 0.84])
    image = ax.imshow(mosaic, vmin=-1, vmax=1, cmap="viridis", interpolation="nearest")
    every_r, every_c = max(1, gh // 8), max(1, gw // 8)  # at most ~8 labels per axis
    ax.set_yticks([r * (gh + 1) + (gh - 1) / 2 for r in range(0, gh, every_r)], [str(r + 1) for r in range(0, gh, every_r)])
    ax.set_xticks([c * (gw + 1) + (gw - 1) / 2 for c in range(0, gw, every_c)], [str(c + 1) for c in range(0, gw, every_c)])
    ax.tick_params(length=0, labelsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("Position embedding similarity", fontsize=10)
    fig.canvas.draw()  # places the equal-aspect axes, so the colour bar can match its height
    box = ax.get_position()
    fig.colorbar(image, cax=fig.add_axes([box.x1 + 0.03, box.y0, 0.022, box.height]), label="cosine similarity")
    return _png(plt, fig)


def attention_distance(distance: np.ndarray, image_side: int, uniform: float | None = None) -> bytes:
    """(layers, heads) mean attention distances as a scatter against depth, one point per head (Figure 7,
    right). The y axis spans the image side, the paper's scale; `uniform` (the distance of a head attending to all
    patches equally) is drawn dashed for reference."""
    from matplotlib.ticker import MaxNLocator

    plt, fig = _figure(SIZES["attention_distance"])
    ax = fig.add_subplot(1, 1, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if uniform is not None:
        ax.axhline(uniform, ls="--", c="gray", lw=1, label="uniform attention")
    layers, heads = distance.shape
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), distance[:, h], s=14, alpha=0.8, label=f"head {h + 1}" if heads <= 16 else None)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xlim(0.5, layers + 0.5)
    ax.set_ylim(0, image_side)
    ax.set_title("Mean attention distance per head")
    if heads <= 16 or uniform is not None:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    return _png(plt, fig)


def rollout_overlay(images: np.ndarray, maps: np.ndarray) -> bytes:
    """Input images (n, H, W, 3) above their class-token rollout maps (n, gh, gw), each map upsampled bilinearly to
    the image and laid over it."""
    from PIL import Image

    n = len(images)
    plt, fig = _figure(rollout_size(n))
    for i, (img, m) in enumerate(zip(images, maps)):
        h, w = img.shape[:2]
        heat = np.asarray(Image.fromarray(m.astype(np.float32)).resize((w, h), Image.BILINEAR))
        top = fig.add_axes([i / n, 0.5, 1 / n, 0.5])
        top.imshow(img)
        bottom = fig.add_axes([i / n, 0.0, 1 / n, 0.5])
        bottom.imshow(img)
        bottom.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in (top, bottom):
            ax.axis("off")
    return _png(plt, fig)
