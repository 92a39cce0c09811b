"""Crop the largest face with OpenCV's bundled Haar cascade (seed 004's `facecrop`)."""

from __future__ import annotations

import functools

import cv2
import numpy as np


@functools.cache
def _detector() -> cv2.CascadeClassifier:
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def crop_largest_face(image: np.ndarray, margin: float = 0.3) -> np.ndarray:
    """Return the largest detected face with `margin` around it, or the image unchanged."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    min_side = max(24, min(gray.shape) // 10)
    faces = _detector().detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    if len(faces) == 0:
        return image
    x, y, w, h = max(faces, key=lambda box: box[2] * box[3])
    pad_x, pad_y = int(w * margin), int(h * margin)
    top, left = max(0, y - pad_y), max(0, x - pad_x)
    bottom, right = min(image.shape[0], y + h + pad_y), min(image.shape[1], x + w + pad_x)
    return np.ascontiguousarray(image[top:bottom, left:right])
