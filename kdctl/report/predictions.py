"""Side-by-side predictions (teacher / baseline / distilled) on a few validation images, boxes and scores drawn."""

from __future__ import annotations

from pathlib import Path

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]


def prediction_grid(models: list[tuple[str, Path]], images: list[Path], ds, imgsz: int, out: Path,
                    conf: float = 0.25, cell: int = 240) -> Path:
    """One row per image, one column per model (``(label, weights.pt)``); detections above ``conf``, named by the
    dataset ``ds``. A model of more classes (a COCO teacher) is shown as distill reads it, for the dataset's
    classes (:func:`kdctl.models.dataset_classes`)."""
    from PIL import Image, ImageDraw

    from kdctl.detectors import load_detector
    from kdctl.evaluate import torch_backend
    from kdctl.evaluate.predict import load_rgb, predict_images
    from kdctl.models import dataset_classes

    names = ds.names
    cols = []
    for label, weights in models:
        model, _ = dataset_classes(load_detector(weights), ds)
        dets = predict_images(torch_backend(model), images, imgsz, conf=conf)
        cols.append((label, dets))
    head = 22
    grid = Image.new("RGB", (cell * len(cols), head + cell * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, _) in enumerate(cols):
        draw.text((c * cell + 6, 5), label, fill=(0, 0, 0))
    for r, img_path in enumerate(images):
        img = load_rgb(img_path)
        h, w = img.shape[:2]
        scale = cell / max(h, w)
        for c, (_, dets) in enumerate(cols):
            tile = Image.fromarray(img).resize((max(1, int(w * scale)), max(1, int(h * scale))))
            d = ImageDraw.Draw(tile)
            det = dets[r]
            for (x1, y1, x2, y2), score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist()):
                colour = PALETTE[int(cls) % len(PALETTE)]
                d.rectangle([x1 * scale, y1 * scale, x2 * scale, y2 * scale], outline=colour, width=2)
                name = names[int(cls)] if int(cls) < len(names) else f"class {int(cls)}"  # a teacher of others
                d.text((x1 * scale + 2, max(0, y1 * scale - 11)), f"{name} {score:.2f}", fill=colour)
            grid.paste(tile, (c * cell, head + r * cell))
    grid.save(out)
    return out
