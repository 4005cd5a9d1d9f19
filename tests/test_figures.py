"""aejax.figures: the image strips hold the images, and importing the module leaves matplotlib's
backend to the user."""

import os
import subprocess
import sys

import numpy as np
from matplotlib import image as mpimg

from aejax import figures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_strip_places_each_image_between_white_gaps():
    images = np.random.default_rng(0).uniform(-0.5, 1.5, size=(3, 4, 4)).astype(np.float32)
    got = figures.strip(images, gap=2)
    assert got.shape == (4, 3 * 4 + 2 * 2)
    for c in range(3):
        np.testing.assert_array_equal(got[:, 6 * c:6 * c + 4], np.clip(images[c], 0, 1))
    np.testing.assert_array_equal(got[:, [4, 5, 10, 11]], 1.0)


def test_image_rows_writes_a_row_per_array(tmp_path):
    dark = np.zeros((5, 784), np.float32)
    light = np.ones((5, 28, 28, 1), np.float32)
    path = figures.image_rows([dark, light], ["dark", "light"], str(tmp_path / "rows.png"),
                              title="two rows")
    pixels = mpimg.imread(path)[..., :3].mean(axis=2)  # white background, grey levels
    dark_lines = np.flatnonzero((pixels < 0.1).mean(axis=1) > 0.5)
    # The dark row's images darken a band of lines above; the light row's, below, none.
    assert len(dark_lines) > 0.2 * len(pixels) and dark_lines.max() < 0.6 * len(pixels)


def test_importing_figures_keeps_the_users_backend(tmp_path):
    code = ("import sys, matplotlib; from aejax import figures; import numpy as np; "
            f"figures.learning_curves([{{'epoch': 1, 'train_loss': 1.0}}], {str(tmp_path / 'c.png')!r}); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, MPLBACKEND="svg"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["svg", "False"]
    assert (tmp_path / "c.png").stat().st_size > 1000
