"""PP and XP appearance of each class, then camera effects (blur, vignetting, noise).

Each mineral renderer gets only its own pixels (flat indices) and the per-grain parameters, so
cost is proportional to the image whatever the number of grains. Colours are channel-first
(3, n) float32 because 1-D gathers/scatters are several times faster than row-wise ones.
PP colours are built in sRGB (0..255); XP colours come from the interference-colour model in
linear light and are encoded at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinseg.synth.grains import CALCITE, CLAY, DOLOMITE, FELDSPAR, OPAQUE, OTHERS, PORE, QUARTZ, Geometry
from thinseg.synth.noise import blur, blur_reach, smooth_noise, white_noise
from thinseg.synth.optics import BIREFRINGENCE, THICKNESS_NM, interference_colour, linear_to_srgb255

#: Colour channels as a float32 (3, n) array, one column per pixel.
Channels = npt.NDArray[np.float32]

#: PP base colours (sRGB).
PP_COLOUR: dict[int | str, tuple[float, ...]] = {
    CALCITE: (226, 220, 209),
    DOLOMITE: (219, 209, 190),
    CLAY: (178, 166, 126),
    PORE: (66, 116, 204),
    QUARTZ: (236, 235, 231),
    "opaque": (30, 28, 27),
    "feldspar": (205, 197, 187),
}

#: How dark a boundary of each class is in PP: high-relief carbonates against epoxy (n = 1.54)
#: show strong dark rims, quartz (n ~ 1.55) almost none.
RELIEF = np.array([0.0, 0.42, 0.42, 0.12, 0.0, 0.08, 0.3], np.float32)
CONTACT = 0.45  # grain-to-grain boundary darkening in PP
CONTACT_XP = 0.6


def _col(values: tuple[float, ...]) -> np.ndarray:
    return np.asarray(values, np.float32)[:, None]


@dataclass
class Pixels:
    """The pixels of one renderer: flat indices, coordinates, grain ids and body distance."""

    idx: np.ndarray
    x: np.ndarray
    y: np.ndarray
    g: np.ndarray
    key: np.ndarray

    @property
    def n(self) -> int:
        return len(self.idx)


@dataclass
class Fields:
    """Shared flat noise fields: `fine` and `fine2` per-pixel speckle, `medium` (~8 um)
    cloudiness/mottling, `large` (~half a grain) slow variation."""

    fine: np.ndarray
    fine2: np.ndarray
    medium: np.ndarray
    large: np.ndarray


@dataclass
class GrainOptics:
    """Per-grain random optical parameters (one entry per grain id)."""

    ext: np.ndarray  # vibration direction to the polariser (rad)
    sin2phi: np.ndarray  # sin^2 of optic axis to the view: scales retardation
    tint: np.ndarray  # (3, n) PP colour factor
    twin: np.ndarray  # (2, n) twin-set presence (calcite), 0/1
    twin_angle: np.ndarray  # (2, n)
    twin_period: np.ndarray  # (2, n) px
    twin_duty: np.ndarray  # (2, n)
    twin_dext: np.ndarray  # (2, n) extinction offset of the lamellae
    twin_sin2phi: np.ndarray  # (2, n)
    cleave_angle: np.ndarray
    cleave_period: np.ndarray
    cleave_vis: np.ndarray
    undulose: np.ndarray  # extinction sweep across the grain (rad)
    sweep_dir: np.ndarray
    core: np.ndarray  # dolomite cloudy-core size (key units)
    cloud: np.ndarray  # cloudiness strength
    rim_at: np.ndarray  # quartz dust-rim position (key units), 0 = none
    palette: dict[int | str, tuple[float, ...]]  # this section's PP base colours: PP_COLOUR with a small random cast


def draw_optics(rng: np.random.Generator, n: int, res: float) -> GrainOptics:
    """`res` = pixels per reference pixel (1.32 um): keeps twin and cleavage spacings physical."""

    def u(lo: float, hi: float, size: int | tuple[int, int] = n) -> npt.NDArray[np.float32]:
        values: npt.NDArray[np.float32] = rng.uniform(lo, hi, size).astype(np.float32)
        return values

    return GrainOptics(
        ext=u(0, np.pi),
        sin2phi=(1.0 - rng.random(n) ** 2).astype(np.float32),
        tint=(1.0 + rng.normal(0, 0.025, (1, n)) + rng.normal(0, 0.006, (3, n))).astype(np.float32),
        twin=(rng.random((2, n)) < np.array([[0.75], [0.25]])).astype(np.float32),
        twin_angle=u(0, np.pi, (2, n)),
        twin_period=np.maximum(u(6, 18, (2, n)) * res, 2.5),
        twin_duty=np.stack([u(0.2, 0.45), u(0.12, 0.25)]),
        twin_dext=u(0.35, 1.2, (2, n)),
        twin_sin2phi=(1.0 - rng.random((2, n)) ** 2).astype(np.float32),
        cleave_angle=u(0, np.pi),
        cleave_period=np.maximum(u(12, 30) * res, 4.0),
        cleave_vis=u(0.0, 1.0) ** 2,
        undulose=np.where(rng.random(n) < 0.25, u(0.05, 0.25), 0).astype(np.float32),
        sweep_dir=u(0, np.pi),
        core=u(0.35, 0.8),
        cloud=u(0.3, 1.0),
        rim_at=np.where(rng.random(n) < 0.3, u(0.6, 0.9), 0).astype(np.float32),
        palette=_draw_palette(rng),
    )


#: Per-section colour-cast spread of each PP base colour: dyes and clays vary between
#: laboratories, colourless minerals only with the light.
_HUE_SPREAD: dict[int | str, float] = {PORE: 0.05, CLAY: 0.04, "feldspar": 0.015}


def _draw_palette(rng: np.random.Generator) -> dict[int | str, tuple[float, ...]]:
    palette: dict[int | str, tuple[float, ...]] = {}
    for name, colour in PP_COLOUR.items():
        factor = rng.normal(1.0, 0.03) * rng.normal(1.0, _HUE_SPREAD.get(name, 0.006), 3)
        palette[name] = tuple(np.clip(np.asarray(colour) * factor, 0, 255))
    return palette


def render(rng: np.random.Generator, geom: Geometry, res: float) -> tuple[np.ndarray, np.ndarray]:
    """(pp, xp) uint8 (H, W, 3) images of the geometry."""
    h, w = geom.labels.shape
    optics = draw_optics(rng, len(geom.grains), res)
    fields = Fields(
        fine=white_noise(rng, (h * w,)),
        fine2=white_noise(rng, (h * w,)),
        medium=smooth_noise(rng, (h, w), 6.0 * res).ravel(),
        large=smooth_noise(rng, (h, w), 0.4 * geom.cell).ravel(),
    )
    pp = np.empty((3, h * w), np.float32)
    xp = np.empty((3, h * w), np.float32)
    rows = max(1, 262_144 // w)  # strips of ~1 MB per float array: the temporaries stay in cache
    for r0 in range(0, h, rows):
        strip_labels = geom.labels[r0 : r0 + rows].ravel()
        for cls, fn in _RENDERERS.items():
            idx = np.flatnonzero(strip_labels == cls) + r0 * w
            if fn is None:  # Others: opaque grains and K-feldspar are drawn differently
                sub = geom.grains.subtype[geom.gid.ravel()[idx]]
                for kind, fn_kind in ((OPAQUE, _opaque), (FELDSPAR, _feldspar)):
                    _paint(fn_kind, idx[sub == kind], geom, optics, fields, res, pp, xp)
            else:
                _paint(fn, idx, geom, optics, fields, res, pp, xp)
    del fields
    pp = pp.reshape(3, h, w)
    xp = xp.reshape(3, h, w)
    _darken_boundaries(geom, pp, xp)
    camera = _draw_camera(rng, h, w, res)
    pp *= camera.pp_factor
    pp *= camera.vignette
    xp *= camera.xp_factor
    xp *= camera.vignette * camera.vignette
    pp_u8 = _finish(rng, pp, camera, encode=False)
    del pp
    return pp_u8, _finish(rng, xp, camera, encode=True)


Renderer = Callable[["Pixels", Geometry, GrainOptics, Fields, float], tuple[Channels, Channels]]


def _paint(
    fn: Renderer,
    idx: np.ndarray,
    geom: Geometry,
    optics: GrainOptics,
    fields: Fields,
    res: float,
    pp: np.ndarray,
    xp: np.ndarray,
) -> None:
    if idx.size == 0:
        return
    width = geom.labels.shape[1]
    idx_small = idx.astype(np.int32) if idx[-1] < 2**31 else idx  # int32 division is ~2x faster
    px = Pixels(
        idx=idx,
        x=(idx_small % width).astype(np.float32),
        y=(idx_small // width).astype(np.float32),
        g=geom.gid.ravel()[idx],
        key=geom.key.ravel()[idx],
    )
    pp_px, xp_px = fn(px, geom, optics, fields, res)
    for c in range(3):
        pp[c][idx] = pp_px[c]
        xp[c][idx] = xp_px[c]


# ----------------------------------------------------------------------------- helpers


def _base(colour: tuple[float, ...], px: Pixels, optics: GrainOptics) -> Channels:
    out: Channels = np.take(optics.tint, px.g, axis=1)
    out *= _col(colour)
    return out


def _flat(colour: tuple[float, ...], n: int) -> Channels:
    return np.repeat(_col(colour), n, axis=1)


def _edge_thinning(px: Pixels, geom: Geometry, res: float) -> npt.NDArray[np.float32]:
    """Relative section thickness: grains wedge out over a few microns at their free edges,
    which lowers the retardation there (coloured fringes around carbonates)."""
    width_key = (3.0 * res) / geom.grains.radius[px.g]
    thickness: npt.NDArray[np.float32] = np.clip((1.0 - px.key) / width_key, 0.15, 1.0)
    return thickness


def _retardation(mineral: str, sin2phi: np.ndarray) -> np.ndarray:
    return (THICKNESS_NM * BIREFRINGENCE[mineral]) * sin2phi


def _sweep(px: Pixels, geom: Geometry, optics: GrainOptics) -> npt.NDArray[np.float32]:
    """Undulose extinction: the vibration direction rotates across strained grains."""
    gr = geom.grains
    d = optics.sweep_dir[px.g]
    along = ((px.x - gr.cx[px.g]) * np.cos(d) + (px.y - gr.cy[px.g]) * np.sin(d)) / gr.radius[px.g]
    sweep: npt.NDArray[np.float32] = optics.undulose[px.g] * along
    return sweep


def _hash01(a: np.ndarray, b: np.ndarray) -> npt.NDArray[np.float32]:
    """Reproducible pseudo-random [0, 1) from two integer arrays (no float trigonometry)."""
    v = (a * 73856093) ^ (b * 19349663)
    v = (v ^ (v >> 13)) * 1274126177
    unit: npt.NDArray[np.float32] = ((v >> 7) & 1023).astype(np.float32) / 1024.0
    return unit


# ----------------------------------------------------------------------------- minerals


def _calcite(px: Pixels, geom: Geometry, optics: GrainOptics, f: Fields, res: float) -> tuple[Channels, Channels]:
    """Clear PP with rhombohedral cleavage traces; XP high-order creamy white with pastel
    fringes and polysynthetic twin lamellae (one or two sets) at a grain-specific angle."""
    g = px.g
    pp = _base(optics.palette[CALCITE], px, optics)
    wobble = 0.8 * res * f.large[px.idx]
    ext = optics.ext[g]
    s2p = optics.sin2phi[g]
    shade = np.ones(px.n, np.float32)
    for k in range(2):
        lam = _lamellae(px, k, optics, wobble)
        ext = np.where(lam, ext + optics.twin_dext[k][g], ext)
        s2p = np.where(lam, optics.twin_sin2phi[k][g], s2p)
        shade[lam] = 0.975
    shade -= 0.2 * optics.cleave_vis[g] * _cleavage(px, optics, f)
    shade += 0.015 * f.fine[px.idx]
    pp *= shade
    gamma = _retardation("calcite", s2p) * _edge_thinning(px, geom, res)
    xp = interference_colour(gamma, ext + _sweep(px, geom, optics))
    return pp, xp


def _lamellae(px: Pixels, k: int, optics: GrainOptics, wobble: np.ndarray) -> npt.NDArray[np.bool_]:
    """Twin set k: straight parallel lamellae of irregular width and spacing (some slots empty),
    from an integer hash of (slot, grain) so the pattern is exactly reproducible."""
    g = px.g
    angle = optics.twin_angle[k][g]
    s = (px.x * np.cos(angle) + px.y * np.sin(angle) + wobble) / optics.twin_period[k][g]
    slot = np.floor(s)
    h = _hash01(slot.astype(np.int64), g.astype(np.int64) * 2 + k)
    width = optics.twin_duty[k][g] * (0.3 + 1.4 * h)
    inside: npt.NDArray[np.bool_] = ((s - slot) < width) & (h > 0.3) & (optics.twin[k][g] > 0)
    return inside


def _cleavage(px: Pixels, optics: GrainOptics, f: Fields) -> npt.NDArray[np.float32]:
    """Anti-aliased thin lines (two rhombohedral sets 75 deg apart), interrupted by `medium` noise."""
    out = np.zeros(px.n, np.float32)
    for offset in (0.0, 1.309):
        angle = optics.cleave_angle[px.g] + np.float32(offset)
        period = optics.cleave_period[px.g] * (1.0 + 0.4 * offset)
        s = (px.x * np.cos(angle) + px.y * np.sin(angle)) / period
        dist = np.abs(s - np.round(s)) * period
        np.maximum(out, np.clip(1.0 - dist / 0.9, 0.0, 1.0), out=out)
    lines: npt.NDArray[np.float32] = out * (f.medium[px.idx] > -0.1)
    return lines


def _dolomite(px: Pixels, geom: Geometry, optics: GrainOptics, f: Fields, res: float) -> tuple[Channels, Channels]:
    """Rhombs with a cloudy (inclusion-rich) brownish core and clear rim, faint growth zoning;
    XP high-order like calcite but without twins, some with sweeping extinction."""
    g = px.g
    pp = _base(optics.palette[DOLOMITE], px, optics)
    cloud = np.clip((optics.core[g] - px.key) / 0.12 + 0.5, 0.0, 1.0) * optics.cloud[g]
    cloud *= np.clip(0.75 + 0.3 * f.medium[px.idx] + 0.08 * f.fine[px.idx], 0.0, 1.2)
    zoning = 0.04 * (np.sin(px.key * 40.0 + g) > 0.6)
    pp *= 1.0 - cloud * _col((0.30, 0.34, 0.42)) - zoning
    pp *= 1.0 - 0.12 * optics.cleave_vis[g] * _cleavage(px, optics, f)
    gamma = _retardation("dolomite", optics.sin2phi[g]) * _edge_thinning(px, geom, res)
    xp = interference_colour(gamma, optics.ext[g] + _sweep(px, geom, optics))
    xp *= 1.0 - 0.35 * cloud
    return pp, xp


def _quartz(px: Pixels, geom: Geometry, optics: GrainOptics, f: Fields, res: float) -> tuple[Channels, Channels]:
    """Clear, low relief, a few fluid inclusions, some with a dusty rim under an overgrowth;
    XP first-order grey to white/pale yellow, extinct grains dark, some undulose."""
    g = px.g
    pp = _base(optics.palette[QUARTZ], px, optics)
    speck = np.clip((f.fine[px.idx] - 2.15) * 4.0, 0.0, 1.0)
    rim_at = optics.rim_at[g]
    dist = np.abs(px.key - rim_at) * geom.grains.radius[g]
    dust = np.clip(1.0 - dist / (1.5 * res), 0, 1) * (rim_at > 0) * (f.fine2[px.idx] > 0.0)
    pp *= 1.0 - 0.35 * speck - 0.25 * dust
    gamma = _retardation("quartz", optics.sin2phi[g]) * _edge_thinning(px, geom, res)
    xp = interference_colour(gamma, optics.ext[g] + _sweep(px, geom, optics))
    return pp, xp


def _clay(px: Pixels, geom: Geometry, optics: GrainOptics, f: Fields, res: float) -> tuple[Channels, Channels]:
    """Mg-clay (stevensite/kerolite-like) matrix and peloids: pale brown-green, mottled; XP a dim
    speckled aggregate of first-order colours (many tiny crystals)."""
    pp = _flat(optics.palette[CLAY], px.n)
    mottle = 14.0 * f.medium[px.idx] + 5.0 * f.fine[px.idx]
    pp += mottle * _col((1.0, 1.0, 0.8))
    pp *= np.where(px.key < 1.0, _col((0.9, 0.88, 0.82)), np.float32(1.0))  # peloids a bit darker
    other = f.medium[(px.idx + 37 * 1031 + 11) % f.medium.size]  # a shifted copy: independent enough
    gamma = 110.0 + 70.0 * other + 30.0 * f.fine2[px.idx]
    theta = 1.2 * f.medium[px.idx] + 0.3 * f.fine[px.idx]
    xp = interference_colour(np.clip(gamma, 0, None), theta)
    xp *= _col((0.42, 0.36, 0.27))
    return pp, xp


def _pore(px: Pixels, geom: Geometry, optics: GrainOptics, f: Fields, res: float) -> tuple[Channels, Channels]:
    """Blue-dyed epoxy: blue in PP, isotropic hence black between crossed polars."""
    pp = _flat(optics.palette[PORE], px.n)
    pp += (5.0 * f.large[px.idx] + 1.5 * f.fine[px.idx]) * _col((0.6, 0.8, 1.0))
    return pp, np.full((3, px.n), 0.002, np.float32)


def _opaque(px: Pixels, geom: Geometry, optics: GrainOptics, f: Fields, res: float) -> tuple[Channels, Channels]:
    """Opaque grains (pyrite, oxides): black in both PP and XP."""
    pp = _flat(optics.palette["opaque"], px.n)
    pp += 3.0 * f.fine[px.idx]
    return pp, np.full((3, px.n), 0.001, np.float32)


def _feldspar(px: Pixels, geom: Geometry, optics: GrainOptics, f: Fields, res: float) -> tuple[Channels, Channels]:
    """K-feldspar: turbid brownish-grey PP (clay alteration), first-order grey XP, simple twin
    splitting the grain in two halves with different extinction."""
    g = px.g
    gr = geom.grains
    pp = _base(optics.palette["feldspar"], px, optics)
    alteration = np.clip(0.45 + 0.45 * f.medium[px.idx] + 0.15 * f.fine[px.idx], 0.0, 1.0) * optics.cloud[g]
    pp *= 1.0 - alteration * _col((0.16, 0.19, 0.25))
    a = optics.twin_angle[0][g]
    half = ((px.x - gr.cx[g]) * np.cos(a) + (px.y - gr.cy[g]) * np.sin(a)) > 0
    ext = optics.ext[g] + half * optics.twin_dext[0][g]
    gamma = _retardation("feldspar", optics.sin2phi[g]) * _edge_thinning(px, geom, res)
    xp = interference_colour(gamma, ext)
    xp *= 1.0 - 0.3 * alteration
    return pp, xp


_RENDERERS: dict[int, Renderer | None] = {
    CALCITE: _calcite,
    DOLOMITE: _dolomite,
    CLAY: _clay,
    PORE: _pore,
    QUARTZ: _quartz,
    OTHERS: None,
}


# ----------------------------------------------------------------------------- boundaries, camera


def _darken_boundaries(geom: Geometry, pp: np.ndarray, xp: np.ndarray) -> None:
    """Thin dark lines: grain-to-grain contacts in both images, relief rims against epoxy/clay in PP."""
    labels, gid = geom.labels, geom.gid
    body = geom.key < 1.0
    strength = np.zeros(labels.shape, np.float32)
    contact = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a = (slice(0, -1), slice(None)) if axis == 0 else (slice(None), slice(0, -1))
        b = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
        la, lb = labels[a], labels[b]
        touching = (gid[a] != gid[b]) & body[a] & body[b]
        relief = np.maximum(RELIEF[la], RELIEF[lb])
        relief *= la != lb
        relief[touching] = CONTACT
        np.maximum(strength[a], relief, out=strength[a])
        contact[a] |= touching
    strength = 1.0 - strength
    pp *= strength
    xp *= np.where(contact, np.float32(1.0 - CONTACT_XP), np.float32(1.0))


@dataclass
class Camera:
    """One acquisition: white balance/exposure, XP gain, vignetting, blur and noise level,
    drawn per section so that a model trained on these sees a spread of microscopes."""

    pp_factor: np.ndarray  # (3, 1, 1)
    xp_factor: np.ndarray  # (3, 1, 1), linear light
    vignette: np.ndarray  # (H, W)
    sigma: float
    noise_level: float


def _draw_camera(rng: np.random.Generator, h: int, w: int, res: float) -> Camera:
    return Camera(
        vignette=_vignette(rng, h, w),
        pp_factor=(rng.normal(1.0, 0.03) * rng.normal(1.0, 0.012, (3, 1, 1))).astype(np.float32),
        xp_factor=(rng.uniform(1.35, 2.0) * rng.normal(1.0, 0.02, (3, 1, 1))).astype(np.float32),
        sigma=float(rng.uniform(0.45, 0.8)) * max(res, 0.5),
        noise_level=float(rng.uniform(1.5, 3.5)),
    )


def _vignette(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Radial light fall-off (8-25 % at the corners) around a slightly off-centre axis."""
    strength = rng.uniform(0.08, 0.25)
    cy, cx = (h - 1) / 2 * (1 + rng.uniform(-0.1, 0.1)), (w - 1) / 2 * (1 + rng.uniform(-0.1, 0.1))
    r2_max = (h / 2) ** 2 + (w / 2) ** 2
    yy = ((np.arange(h, dtype=np.float32) - cy) ** 2 / r2_max)[:, None]
    xx = ((np.arange(w, dtype=np.float32) - cx) ** 2 / r2_max)[None, :]
    return (1.0 - strength * (yy + xx)).astype(np.float32)


def _finish(rng: np.random.Generator, image: np.ndarray, camera: Camera, encode: bool) -> np.ndarray:
    """(3, H, W) float -> (H, W, 3) uint8: sRGB-encode (XP), blur (optics), add roughly
    signal-dependent sensor noise. Strips of rows with a halo as deep as the blur reaches keep
    the work in cache; the result is the same as blurring the whole image."""
    _, h, w = image.shape
    out = np.empty((h, w, 3), np.uint8)
    halo = blur_reach(camera.sigma)
    rows = max(8, 262_144 // w)
    for c in range(3):
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a, b = max(0, r0 - halo), min(h, r1 + halo)
            band = linear_to_srgb255(image[c, a:b]) if encode else image[c, a:b]
            band = blur(band, camera.sigma)[r0 - a : r0 - a + (r1 - r0)]
            noise = white_noise(rng, band.shape)
            noise *= band * np.float32(0.5 * camera.noise_level / 255.0) + np.float32(0.6 * camera.noise_level)
            band += noise
            band += 0.5
            np.clip(band, 0, 255, out=band)
            out[r0:r1, :, c] = band
    return out
