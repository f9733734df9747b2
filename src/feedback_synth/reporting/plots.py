"""Pictures a person would rather see than read: sample grids and per-class accuracy."""
from __future__ import annotations

import io as _io
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def sample_grid(sections: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str], per_class: int = 8,
                title: str = "") -> bytes:
    """One row per class; for each section (e.g. real / unguided / guided) ``per_class`` images.

    ``sections`` maps a name to (uint8 images (N, H, W, C), labels).
    """
    n_sec = len(sections)
    fig, axes = plt.subplots(len(class_names), n_sec, figsize=(1.1 * per_class * n_sec, 1.15 * len(class_names)),
                             squeeze=False)
    for s, (name, (images, labels)) in enumerate(sections.items()):
        for c, cname in enumerate(class_names):
            ax = axes[c, s]
            picks = images[labels == c][:per_class]
            h, w, ch = images.shape[1:] if len(images) else (16, 16, 1)
            row = np.zeros((h, per_class * (w + 1), ch), dtype=np.uint8)
            for i, img in enumerate(picks):
                row[:, i * (w + 1):i * (w + 1) + w] = img
            ax.imshow(row.squeeze(-1) if ch == 1 else row, cmap="gray" if ch == 1 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if s == 0:
                ax.set_ylabel(cname, rotation=0, ha="right", va="center")
            if c == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    return _png(fig)


def per_class_accuracy(before: list[Optional[float]], after: list[Optional[float]], class_names: list[str],
                       train_counts: list[int], labels: tuple[str, str] = ("baseline", "retrained")) -> bytes:
    """Grouped bars of per-class test accuracy, classes in order of their training counts."""
    x = np.arange(len(class_names))
    b = np.array([np.nan if v is None else v for v in before])
    a = np.array([np.nan if v is None else v for v in after])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(class_names)), 3.6))
    ax.bar(x - 0.2, b, 0.4, label=labels[0], color="#9aa5b1")
    ax.bar(x + 0.2, a, 0.4, label=labels[1], color="#2f7ed8")
    ax.set_xticks(x, [f"{n}\n(n={k})" for n, k in zip(class_names, train_counts)], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("Per-class accuracy before / after retraining with synthetic data")
    ax.legend(loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def confusion_matrix(cm: list[list[int]], class_names: list[str], title: str = "") -> bytes:
    m = np.asarray(cm, dtype=float)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.45 * len(class_names) + 2, 0.45 * len(class_names) + 1.5))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, fontsize=7, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def rounds_curve(reference: dict[str, float], rounds: list[dict[str, Any]]) -> bytes:
    """Few-shot (or worst-group) and worst-class test accuracy per round; round 0 = no synthesis."""
    keys = [k for k in ("few", "worst_group", "worst_class") if k in reference]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [0] + [r["round"] for r in rounds]
    for k in keys:
        ax.plot(x, [reference[k]] + [r.get(k) for r in rounds], marker="o", label=k)
    ax.set_xticks(x, ["none"] + [str(r["round"]) for r in rounds])
    ax.set_xlabel("feedback round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Accuracy per round of feedback")
    return _png(fig)


def loss_curve(losses: list[float], title: str = "") -> bytes:
    """A training loss per step, with its moving average over 50 steps."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses, lw=0.6, alpha=0.4, label="per step")
    if len(losses) >= 50:
        smooth = np.convolve(losses, np.ones(50) / 50, mode="valid")
        ax.plot(np.arange(49, len(losses)), smooth, lw=1.5, label="mean of 50 steps")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction loss")
    ax.set_title(title)
    ax.legend()
    return _png(fig)


GAP_MEASURES = (("off_support", "off-support share (lower is closer)"),
                ("discriminator", "real-vs-synthetic accuracy (0.5 = indistinguishable)"),
                ("near_copy", "near-copy share (lower is better)"))


def gap_per_class(before: Optional[dict[str, Any]], after: dict[str, Any], class_names: list[str],
                  train_counts: list[int], labels: tuple[str, str] = ("before adaptation", "after adaptation")) -> bytes:
    """Per class, the gap measures of ``synthesis.gap`` before and after (``before`` None: one set)."""
    fig, axes = plt.subplots(1, len(GAP_MEASURES), figsize=(4.2 * len(GAP_MEASURES), 3.4))
    x = np.arange(len(class_names))
    for ax, (key, name) in zip(axes, GAP_MEASURES):
        sets = [(labels[0], before), (labels[1], after)] if before is not None else [(labels[1], after)]
        width = 0.8 / len(sets)
        for i, (label, g) in enumerate(sets):
            values = [np.nan if v is None else v for v in (g.get(key) or {}).get("per_class") or [None] * len(x)]
            ax.bar(x + (i - (len(sets) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(x, [f"{c}\n({n})" for c, n in zip(class_names, train_counts)], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    fig.suptitle("Gap to the real data per class (class (train images))", fontsize=10)
    return _png(fig)
