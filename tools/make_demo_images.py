"""Draw the demo catalog's product pictures: demo/images/<product id>.png.

Flat illustrations, 400x400 (twice the widest the shipped templates show them,
for high-density screens), drawn at twice that size and scaled down so edges
are smooth, then reduced to a small palette: a few KB each. PNG, because every
mail client shows it (SVG is blocked by Gmail and Outlook). The server serves
them at /demo/images/<name> (see edge/http_server.py); the demo catalog names
them by that path.

Run after changing a drawing: ``.venv/bin/python tools/make_demo_images.py``
(Pillow comes with the dev install). The output is committed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "demo" / "images"
SIZE = 400
S = 2  # drawn at S times the size, then scaled down (anti-aliasing)

Draw = ImageDraw.ImageDraw
Box = tuple[float, float, float, float]


def box(x0: float, y0: float, x1: float, y1: float) -> Box:
    """A box on the 400-unit canvas, in drawing pixels."""
    return (x0 * S, y0 * S, x1 * S, y1 * S)


def points(*xy: tuple[float, float]) -> list[tuple[float, float]]:
    return [(x * S, y * S) for x, y in xy]


def shadow(d: Draw, cx: float, width: float, y: float = 330) -> None:
    d.ellipse(box(cx - width / 2, y - 10, cx + width / 2, y + 10), fill="#00000022")


def steam(d: Draw, xs: tuple[float, ...], top: float, colour: str) -> None:
    for x in xs:
        d.arc(box(x - 14, top, x + 14, top + 40), 90, 270, fill=colour, width=5 * S)
        d.arc(box(x - 14, top + 36, x + 14, top + 76), 270, 90, fill=colour, width=5 * S)


def mug_ceramic(d: Draw) -> None:
    shadow(d, 190, 200)
    d.ellipse(box(230, 170, 320, 280), outline="#2f7f73", width=22 * S)
    d.rounded_rectangle(box(100, 140, 270, 330), radius=26 * S, fill="#3fa292")
    d.ellipse(box(100, 122, 270, 158), fill="#2f7f73")
    d.ellipse(box(112, 128, 258, 152), fill="#5c4033")
    d.rectangle(box(118, 200, 252, 212), fill="#58b8a8")
    steam(d, (160, 210), 40, "#9fb8b3")


def mug_espresso(d: Draw) -> None:
    for cx in (130, 270):
        shadow(d, cx, 150)
        d.ellipse(box(cx - 80, 300, cx + 80, 336), fill="#e9e4dc", outline="#c8bfb2", width=3 * S)
        d.ellipse(box(cx + 30, 228, cx + 82, 280), outline="#f5f1ea", width=12 * S)
        d.pieslice(box(cx - 55, 170, cx + 55, 320), 0, 180, fill="#f5f1ea")
        d.rectangle(box(cx - 55, 200, cx + 55, 246), fill="#f5f1ea")
        d.ellipse(box(cx - 55, 186, cx + 55, 214), fill="#d9d2c7")
        d.ellipse(box(cx - 47, 190, cx + 47, 210), fill="#6b3e26")
    steam(d, (130, 270), 90, "#b9aea2")


def kettle_steel(d: Draw) -> None:
    shadow(d, 200, 240)
    d.line(
        points((270, 250), (330, 200), (345, 150), (372, 130)), fill="#8d949b", width=16 * S, joint="curve"
    )
    d.arc(box(125, 95, 285, 255), 200, 340, fill="#2b2b2b", width=16 * S)
    d.polygon(points((110, 320), (130, 170), (270, 170), (290, 320)), fill="#b8bfc6")
    d.polygon(points((150, 320), (160, 170), (190, 170), (185, 320)), fill="#d5dadf")
    d.rounded_rectangle(box(105, 312, 295, 330), radius=8 * S, fill="#8d949b")
    d.ellipse(box(140, 150, 260, 182), fill="#9aa2a9")
    d.ellipse(box(188, 132, 212, 156), fill="#2b2b2b")


def kettle_electric(d: Draw) -> None:
    shadow(d, 200, 250)
    d.rounded_rectangle(box(95, 300, 305, 334), radius=10 * S, fill="#3a3a3a")
    d.polygon(points((240, 150), (300, 130), (300, 146), (260, 180)), fill="#e8e8e8")
    d.rounded_rectangle(
        box(120, 120, 270, 305), radius=30 * S, fill="#f2f2f2", outline="#cfcfcf", width=3 * S
    )
    d.rounded_rectangle(box(80, 140, 125, 280), radius=18 * S, outline="#3a3a3a", width=14 * S)
    d.rectangle(box(150, 170, 170, 280), fill="#cde7f5")
    for y in (195, 225, 255):
        d.line(points((150, y), (162, y)), fill="#7aa9c4", width=3 * S)
    d.rounded_rectangle(box(135, 108, 255, 128), radius=8 * S, fill="#3a3a3a")


def teapot_cast(d: Draw) -> None:
    shadow(d, 200, 260)
    d.polygon(points((120, 250), (70, 180), (56, 170), (70, 165), (140, 220)), fill="#2f3437")
    d.arc(box(250, 170, 340, 280), 270, 90, fill="#2f3437", width=18 * S)
    d.ellipse(box(100, 150, 300, 330), fill="#3b4145")
    for y in (190, 225, 260, 295):
        for x in range(130, 280, 24):
            d.ellipse(box(x, y, x + 8, y + 8), fill="#4b5257")
    d.ellipse(box(140, 136, 260, 170), fill="#2f3437")
    d.ellipse(box(186, 112, 214, 140), fill="#2f3437")


def tin(d: Draw, body: str, band: str, lid: str) -> None:
    shadow(d, 200, 200)
    d.rounded_rectangle(box(110, 110, 290, 330), radius=14 * S, fill=body)
    d.rounded_rectangle(box(104, 90, 296, 130), radius=10 * S, fill=lid)
    d.rectangle(box(110, 190, 290, 270), fill=band)


def leaf(d: Draw, cx: float, cy: float, colour: str, vein: str) -> None:
    d.ellipse(box(cx - 40, cy - 18, cx + 40, cy + 18), fill=colour)
    d.line(points((cx - 36, cy), (cx + 36, cy)), fill=vein, width=3 * S)


def tea_sencha(d: Draw) -> None:
    tin(d, "#6f9e3a", "#f3efe2", "#4f7a25")
    leaf(d, 185, 225, "#6f9e3a", "#f3efe2")
    leaf(d, 225, 238, "#8cbf4f", "#f3efe2")


def tea_earlgrey(d: Draw) -> None:
    tin(d, "#2d4a7a", "#f3efe2", "#1d3259")
    for cx, cy in ((170, 222), (205, 240), (240, 220)):
        for dx, dy in ((0, -11), (11, 0), (0, 11), (-11, 0)):
            d.ellipse(box(cx + dx - 8, cy + dy - 8, cx + dx + 8, cy + dy + 8), fill="#4f6fd1")
        d.ellipse(box(cx - 5, cy - 5, cx + 5, cy + 5), fill="#f2c14e")


def bean(d: Draw, cx: float, cy: float) -> None:
    d.ellipse(box(cx - 18, cy - 12, cx + 18, cy + 12), fill="#5a3520")
    d.arc(box(cx - 16, cy - 4, cx + 16, cy + 6), 200, 340, fill="#2e1a0f", width=3 * S)


def coffee_beans(d: Draw) -> None:
    shadow(d, 200, 220)
    d.polygon(points((120, 330), (130, 110), (270, 110), (280, 330)), fill="#b98a5a")
    d.polygon(points((130, 110), (150, 80), (250, 80), (270, 110)), fill="#a3764a")
    d.rectangle(box(145, 170, 255, 250), fill="#f3e9dc")
    bean(d, 200, 210)
    for cx, cy in ((80, 320), (320, 316), (300, 338), (100, 342)):
        bean(d, cx, cy)


def grinder_burr(d: Draw) -> None:
    shadow(d, 200, 160)
    d.rounded_rectangle(box(145, 140, 255, 330), radius=16 * S, fill="#c4c9ce")
    d.rectangle(box(145, 230, 255, 300), fill="#8a6a4f")
    d.rectangle(box(190, 90, 210, 140), fill="#3a3a3a")
    d.line(points((200, 92), (320, 70)), fill="#3a3a3a", width=12 * S)
    d.ellipse(box(305, 42, 345, 82), fill="#8a6a4f")
    d.ellipse(box(140, 128, 260, 152), fill="#9aa2a9")


def dripper_v60(d: Draw) -> None:
    shadow(d, 200, 200)
    d.rounded_rectangle(
        box(130, 230, 270, 335), radius=18 * S, fill="#ffffff", outline="#c9d3da", width=3 * S
    )
    d.rectangle(box(140, 290, 260, 325), fill="#6b3e26")
    d.rectangle(box(110, 218, 290, 232), fill="#d85c41")
    d.polygon(points((100, 110), (300, 110), (220, 220), (180, 220)), fill="#e76f51")
    d.polygon(points((120, 118), (280, 118), (215, 205), (185, 205)), fill="#f2a08a")
    d.ellipse(box(96, 100, 304, 122), fill="#d85c41")


def filters_100(d: Draw) -> None:
    shadow(d, 200, 240)
    for n, colour in enumerate(("#e8dcc4", "#efe5d0", "#f6efe1")):
        dx, dy = n * 16 - 16, n * 18 - 18
        d.polygon(
            points((100 + dx, 130 + dy), (300 + dx, 130 + dy), (230 + dx, 310 + dy), (170 + dx, 310 + dy)),
            fill=colour,
            outline="#c9b896",
        )
    for y in (170, 200, 230):
        d.line(points((150, y), (250, y)), fill="#d9caa8", width=2 * S)


def scale_digital(d: Draw) -> None:
    shadow(d, 200, 280, 300)
    d.rounded_rectangle(box(70, 180, 330, 300), radius=18 * S, fill="#26292c")
    d.rounded_rectangle(box(85, 168, 315, 196), radius=10 * S, fill="#3a3f44")
    d.rounded_rectangle(box(130, 220, 270, 270), radius=6 * S, fill="#9fd8c9")
    for x in (150, 190, 230):  # "8.8.8"
        d.rectangle(box(x, 230, x + 24, 234), fill="#1f3b35")
        d.rectangle(box(x, 243, x + 24, 247), fill="#1f3b35")
        d.rectangle(box(x, 256, x + 24, 260), fill="#1f3b35")
    d.ellipse(box(290, 232, 312, 254), fill="#e76f51")


#: product id -> (background, drawing)
DRAWINGS: dict[str, tuple[str, Callable[[Draw], None]]] = {
    "mug-ceramic": ("#e6f2ef", mug_ceramic),
    "mug-espresso": ("#f4ebe1", mug_espresso),
    "kettle-steel": ("#eceff2", kettle_steel),
    "kettle-electric": ("#e8f1f6", kettle_electric),
    "teapot-cast": ("#efe9e1", teapot_cast),
    "tea-sencha": ("#eef4e4", tea_sencha),
    "tea-earlgrey": ("#e7ecf7", tea_earlgrey),
    "coffee-beans": ("#f3ebe0", coffee_beans),
    "grinder-burr": ("#eeeae6", grinder_burr),
    "dripper-v60": ("#fbece6", dripper_v60),
    "filters-100": ("#f5f2ea", filters_100),
    "scale-digital": ("#e9eef0", scale_digital),
}


def render(background: str, draw: Callable[[Draw], None]) -> Image.Image:
    canvas = Image.new("RGB", (SIZE * S, SIZE * S), background)
    draw(ImageDraw.Draw(canvas, "RGBA"))
    small = canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return small.quantize(colors=48, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for product_id, (background, draw) in DRAWINGS.items():
        path = OUT / f"{product_id}.png"
        render(background, draw).save(path, optimize=True)
        print(f"{path.relative_to(OUT.parents[1])}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
