"""Renders every single-code-point colour glyph of Noto Color Emoji into an image folder with sidecar captions.

  apt-get install fonts-noto-color-emoji     # Debian; the font file is NotoColorEmoji.ttf
  python tools/make_emoji_folder.py --out=runs/emoji [--size=32] [--limit=N]

Each glyph becomes `u1f600.png` (RGB, the glyph on white, scaled to fit --size) and `u1f600.txt` holding its Unicode
name in lower case ("grinning face"), the layout `data.source=folder` reads (captions.source="sidecar"). The glyph
list comes from the font's character map (each code point with a Unicode name whose category is "So", symbol other);
sequences (flags, skin tones, ZWJ families) are not rendered. A colour bitmap font (CBDT) draws at its one strike
size, 109 px; the glyph's bounding box is padded to a square and downscaled with Pillow's antialiasing BICUBIC.
"""

import pathlib
import sys
import unicodedata

from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

from clipgen_jax import cli

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
STRIKE_SIZE = 109  # the only size of Noto Color Emoji's CBDT bitmaps
BACKGROUND = (255, 255, 255)

_FONT = flags.DEFINE_string("font", DEFAULT_FONT, "Colour emoji font file (CBDT, e.g. Debian's "
                            "fonts-noto-color-emoji).")
_OUT = flags.DEFINE_string("out", None, "Output folder (created; existing files are overwritten).")
_SIZE = flags.DEFINE_integer("size", 32, "Side of the square images in pixels.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Render only the first N glyphs in code point order (0: all).")


def emoji_code_points(font_path: str) -> list[int]:
    """The font's single code points that have a Unicode name of category "So", in code point order."""
    from fontTools import ttLib  # a dependency of matplotlib, which the package requires

    with ttLib.TTFont(font_path, lazy=True) as font:
        cmap = font.getBestCmap()
    return sorted(cp for cp in cmap if unicodedata.category(chr(cp)) == "So" and unicodedata.name(chr(cp), ""))


def render_glyph(font: ImageFont.FreeTypeFont, character: str, size: int) -> Image.Image | None:
    """The glyph in colour on white, its bounding box centred in a square and scaled to `size`; None when it draws
    nothing."""
    canvas = Image.new("RGBA", (2 * STRIKE_SIZE, 2 * STRIKE_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((STRIKE_SIZE // 2, STRIKE_SIZE // 2), character, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), BACKGROUND + (255,))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def write_folder(font_path: str, out: pathlib.Path, size: int, limit: int = 0) -> int:
    """Renders the glyphs into `out` (PNG + caption .txt each); returns how many were written."""
    if not pathlib.Path(font_path).is_file():
        raise FileNotFoundError(f"no font file {font_path}; install it (apt-get install fonts-noto-color-emoji) or "
                                "pass --font")
    font = ImageFont.truetype(font_path, STRIKE_SIZE)
    out.mkdir(parents=True, exist_ok=True)
    code_points = emoji_code_points(font_path)
    written = 0
    for cp in code_points[:limit or None]:
        image = render_glyph(font, chr(cp), size)
        if image is None:
            continue
        image.save(out / f"u{cp:04x}.png")
        (out / f"u{cp:04x}.txt").write_text(unicodedata.name(chr(cp)).lower() + "\n", encoding="utf-8")
        written += 1
    return written


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _OUT.value:
        cli.fail("--out is required: the folder to write the images and captions into")
    try:
        count = write_folder(_FONT.value, pathlib.Path(_OUT.value), _SIZE.value, _LIMIT.value)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {count} images with captions to {_OUT.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
