"""web/uploads.py: what the page's PNG upload turns into (the model's levels), and what it refuses."""
import io

import numpy as np
import pytest
from PIL import Image

from pixelrnn.web.uploads import MAX_BYTES, UploadError, to_levels


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


def test_a_png_of_the_models_size_maps_to_levels_as_the_client_reads_pngs():
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(to_levels(png(grey), (1, 1, 4), 2), [[[0, 0, 1, 1]]])
    np.testing.assert_array_equal(to_levels(png(grey), (1, 1, 4), 256), grey[None])
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0], rgb[0, 1, 2] = 255, 170  # red everywhere, some blue in one pixel
    levels = to_levels(png(rgb), (3, 2, 3), 4)
    assert levels.shape == (3, 2, 3) and levels.dtype == np.uint8
    assert np.all(levels[0] == 3) and np.all(levels[1] == 0) and levels[2, 0, 1] == 2 and levels[2].sum() == 2


def test_other_sizes_and_modes_are_scaled_and_converted():
    big = np.zeros((56, 56), np.uint8)
    big[:28] = 255  # top half white
    levels = to_levels(png(big), (1, 28, 28), 2)
    assert levels.shape == (1, 28, 28) and np.all(levels[0, :14] == 1) and np.all(levels[0, 14:] == 0)
    colour = np.full((4, 4, 3), 255, np.uint8)
    np.testing.assert_array_equal(to_levels(png(colour), (1, 2, 2), 2), np.ones((1, 2, 2)))  # RGB -> grey
    np.testing.assert_array_equal(to_levels(png(big[:4, :4]), (3, 4, 4), 4), np.full((3, 4, 4), 3))  # grey -> RGB


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"GIF89a not a png", 400, "not a PNG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, 400, "cannot be read"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BYTES, 413, "at most"),
])
def test_bad_uploads_are_refused_with_a_reason_and_a_status(data, status, words):
    with pytest.raises(UploadError, match=words) as e:
        to_levels(data, (1, 28, 28), 2)
    assert e.value.status == status
    assert "\n" not in str(e.value)


def test_a_picture_with_too_many_pixels_is_refused_before_it_is_decoded():
    huge = png(np.zeros((4000, 5000), np.uint8))  # 20 M pixels, over MAX_PIXELS
    assert len(huge) < MAX_BYTES  # small on disk, huge in memory: a decompression bomb
    with pytest.raises(UploadError, match="pixels") as e:
        to_levels(huge, (1, 28, 28), 2)
    assert e.value.status == 413
