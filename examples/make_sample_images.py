"""Regenerate examples/images from scikit-image's bundled photographs (public domain / CC0).

Run once by the maintainers (needs scikit-image); the images are committed so that the demo
needs nothing but layertap.
"""

from pathlib import Path

import numpy as np
import skimage.data as d
from PIL import Image

OUT = Path(__file__).parent / "images"
SETS = {
    "objects": ["coffee", "rocket", "camera", "clock", "stereo_motorcycle"],
    "animals": ["chelsea", "horse"],
    "people": ["astronaut"],
    "textures": ["grass", "gravel", "brick", "colorwheel"],
}


def main() -> None:
    for cls, names in SETS.items():
        (OUT / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            arr = getattr(d, name)()
            if isinstance(arr, tuple):
                arr = arr[0]
            if arr.dtype == bool:
                arr = (~arr * 255).astype(np.uint8)
            img = Image.fromarray(arr)
            img.thumbnail((320, 320))
            img.save(OUT / cls / f"{name}.jpg", quality=85)


if __name__ == "__main__":
    main()
