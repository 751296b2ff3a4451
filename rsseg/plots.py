"""Figures logged with runs: confusion matrix and prediction overlays (matplotlib, no display)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass
class Overlay:
    """One validation tile as the overlays figure shows it."""

    image: np.ndarray  # HxWx3 uint8 (first three bands, de-normalised)
    target: np.ndarray  # HxW class indices
    prediction: np.ndarray  # HxW class indices


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str]) -> plt.Figure:
    """Row-normalised confusion matrix (rows: reference, columns: prediction) with counts."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference")
    for i in range(share.shape[0]):
        for j in range(share.shape[1]):
            ax.text(j, i, f"{share[i, j]:.2f}\n{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def colorize(class_map: np.ndarray, colors: list[list[int]], ignore_color: tuple[int, int, int] = (128, 128, 128)) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8; indices without a colour (ignore) are grey."""
    lut = np.tile(np.asarray(ignore_color, dtype=np.uint8), (256, 1))
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return lut[np.clip(class_map, 0, 255).astype(np.uint8)]


def overlays_figure(overlays: list[Overlay], colors: list[list[int]], titles: list[str] | None = None) -> plt.Figure:
    """One row per tile: image, reference, prediction; `titles` name the rows."""
    fig, axes = plt.subplots(len(overlays), 3, figsize=(9, 3 * len(overlays)), squeeze=False)
    for i, (row, overlay) in enumerate(zip(axes, overlays, strict=True)):
        if titles:
            row[0].text(0, -0.12, titles[i], transform=row[0].transAxes, fontsize=8, va="top")
        for ax, picture, title in zip(
            row,
            (overlay.image, colorize(overlay.target, colors), colorize(overlay.prediction, colors)),
            ("image", "reference", "prediction"),
            strict=True,
        ):
            ax.imshow(picture)
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    return fig
