"""Item pictures: category -> silhouette, colour -> paint, material -> texture.

Everything is drawn for a whole batch at once with numpy (no per-pixel Python). Placement, scale,
rotation, lighting, colour jitter, background and noise are random per item, so a picture alone
leaves some doubt about the concept: similar colours blur under jitter and light, textures are
small, related categories share a silhouette.
"""

from __future__ import annotations

import numpy as np

from mmrank.shop_config import COLOURS, ShopConfig

SIZE = 64
# (corners, aspect) of each family's silhouette; corners 0 = round.
FAMILY_SHAPES: tuple[tuple[int, float], ...] = (
    (4, 1.0),
    (3, 1.0),
    (6, 1.0),
    (0, 1.0),
    (5, 1.0),
    (8, 1.0),
    (7, 1.0),
    (0, 1.8),
    (4, 1.8),
    (3, 1.8),
)


def category_shapes(categories: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(corners, aspect, star depth, hole) per category: family silhouette, varied by member."""
    family, member = categories // 4, categories % 4
    shapes = np.array(FAMILY_SHAPES, dtype=np.float64)
    corners = shapes[family, 0].astype(np.int64)
    aspect = shapes[family, 1]
    aspect = np.where(member == 2, np.where(aspect > 1.0, aspect * 0.65, 1.75), aspect)
    star = np.where(member == 1, 0.38, 0.0)
    hole = member == 3
    return corners, aspect, star, hole


def _radius(phi: np.ndarray, corners: np.ndarray, star: np.ndarray) -> np.ndarray:
    """Boundary radius at angle phi for regular polygons (or a circle), optionally star-shaped."""
    k = np.maximum(corners, 1)[:, None, None].astype(np.float64)
    sector = 2 * np.pi / k
    local = np.mod(phi, sector) - sector / 2
    polygon = np.cos(np.pi / k) / np.cos(local)
    radius = np.where(corners[:, None, None] >= 3, polygon, 1.0)
    k_star = np.where(corners >= 3, corners, 6)[:, None, None]
    return radius * (1.0 - star[:, None, None] * 0.5 * (1.0 - np.cos(k_star * phi)))


def _texture(material: int, u: np.ndarray, v: np.ndarray, r_rel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness modulation in [-1, 1]-ish for one material over a batch of local coordinates."""
    n = u.shape[0]
    if material < 0:  # texture not visible in this picture
        return np.zeros_like(u)
    if material == 0:  # cotton: fine grain
        return 0.28 * rng.standard_normal(u.shape)
    if material == 1:  # leather: smooth blotches
        t = np.zeros_like(u)
        for _ in range(3):
            angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
            phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
            t += np.sin(6.0 * (np.cos(angle) * u + np.sin(angle) * v) + phase)
        return 0.22 * t
    if material == 2:  # metal: gradient with a specular highlight
        return 1.1 * np.exp(-((u - 0.25) ** 2 + (v + 0.3) ** 2) / 0.06) - 0.45 * u
    if material == 3:  # wood: wavy grain stripes
        return 0.45 * np.sin(20.0 * u + 2.5 * np.sin(4.0 * v))
    if material == 4:  # wool: knit checks
        return 0.4 * np.sign(np.sin(9 * np.pi * u) * np.sin(9 * np.pi * v))
    if material == 5:  # plastic: flat with a small sharp highlight
        return 0.9 * np.exp(-((u + 0.3) ** 2 + (v + 0.3) ** 2) / 0.02)
    if material == 6:  # glass: bright rim (and see-through, handled by alpha)
        return 0.8 * (r_rel > 0.78) - 0.1
    return 0.35 * np.sin(6.0 * (u + v)) + 0.25 * np.sin(3.0 * (u - v))  # silk: soft sheen


def render(
    category: np.ndarray, colour: np.ndarray, material: np.ndarray, cfg: ShopConfig, rng: np.random.Generator
) -> np.ndarray:
    """uint8 [n, 64, 64, 3] pictures of items with the given attribute ids (material -1: plain)."""
    n = len(category)
    axis = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")
    corners, aspect, star, hole = category_shapes(np.asarray(category))
    scale = rng.uniform(*cfg.scale_range, n)
    centre = rng.uniform(-1, 1, (n, 2)) * (0.92 - scale)[:, None]
    theta = rng.uniform(0, 2 * np.pi, n)
    cos_t, sin_t = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx, dy = x[None] - centre[:, 0, None, None], y[None] - centre[:, 1, None, None]
    stretch = np.sqrt(aspect)[:, None, None]
    u = (cos_t * dx + sin_t * dy) / scale[:, None, None] / stretch
    v = (-sin_t * dx + cos_t * dy) / scale[:, None, None] * stretch
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    boundary = _radius(phi, corners, star)
    pixel = (2.0 / SIZE) / scale[:, None, None]
    alpha = np.clip((boundary - r) / pixel + 0.5, 0.0, 1.0)
    inner = np.clip((r - 0.45 * boundary) / pixel + 0.5, 0.0, 1.0)
    alpha = np.where(hole[:, None, None], alpha * inner, alpha)

    texture = np.zeros_like(u)
    for m in np.unique(material):
        rows = np.flatnonzero(material == m)
        texture[rows] = _texture(int(m), u[rows], v[rows], r[rows] / boundary[rows], rng)
    alpha = np.where((material == 6)[:, None, None], alpha * 0.6, alpha)

    base = np.array([c[1] for c in COLOURS], dtype=np.float64)[np.asarray(colour)]
    paint = base + rng.normal(0, cfg.colour_jitter, (n, 3))
    light = rng.uniform(*cfg.light_range, n)[:, None]
    paint = np.clip(paint * light, 0, 255)[:, None, None, :]
    t = cfg.texture_strength * texture[..., None]
    fg = paint * (1.0 + 0.55 * t) + 55.0 * t

    grey = rng.uniform(30, 225, n)[:, None] + rng.normal(0, 22, (n, 3))
    slope = rng.normal(0, 18, (n, 2))
    bg = grey[:, None, None, :] + (slope[:, 0, None, None] * x + slope[:, 1, None, None] * y)[..., None]
    img = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    img += rng.normal(0, cfg.pixel_noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
