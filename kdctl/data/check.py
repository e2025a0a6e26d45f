"""``kdctl data check``: a dataset read and validated exactly as ``train``, ``distill``, ``eval`` and ``export`` read
it, with every problem listed instead of the first one stopping the run, and what it holds per split and class.

Ultralytics reports corrupt images and labels as it caches a split at the start of training; this says the same
before a run is started, and exits 1 when an image would be refused (or, with ``--skip-invalid``, left out)."""

from __future__ import annotations

from pathlib import Path


def _split_summary(check, names: list[str]) -> dict:
    """What one split holds, from the reader's check of it (``SplitCheck``: the usable images, a line per invalid
    one, objects per class), so no label file is read twice."""
    from kdctl.data.resolve import class_keys

    per_class, keys = check.per_class, class_keys(names)
    return {"images": len(check.images) + len(check.skipped), "usable": len(check.images),
            "skipped": len(check.skipped), "objects": check.objects, "background_images": check.background,
            "zero_size_boxes": len(check.zero_size), "per_class": {n: per_class.get(i, 0) for i, n in enumerate(keys)},
            "classes_without_objects": [n for i, n in enumerate(keys) if not per_class.get(i)]}


def check_dataset(path: str | Path) -> dict:
    """Check an Ultralytics dataset YAML, or the dataset a recipe names (``data:``: yolo, coco or synthetic).
    A problem with the YAML itself (a missing split, a names list that does not parse) is a one-line
    :class:`~kdctl.errors.DataError` / :class:`~kdctl.errors.RecipeError`, as in every command."""
    from kdctl.data.resolve import is_recipe_file, load_yolo_yaml, resolve_data

    path = Path(path)
    if is_recipe_file(path):
        from kdctl.recipe import load_recipe

        ds = resolve_data(load_recipe(path).data, skip_invalid=True)
    else:
        ds = load_yolo_yaml(path, skip_invalid=True)
    splits = {split: _split_summary(ds.checks[split], ds.names) for split in ("train", "val")}
    problems = {split: ds.skipped[split] for split in splits if ds.skipped.get(split)}
    return {"data": str(ds.yaml), "source": str(path), "names": ds.names, "splits": splits, "problems": problems,
            "notes": ds.notes + _zero_size_notes(ds), "ok": not problems}


def _zero_size_notes(ds) -> list[str]:
    """Boxes of zero width or height are valid label lines (Ultralytics keeps them), but no detection overlaps one:
    in the split that is scored each is a miss, in training its augmentation drops them."""
    out = []
    for split, key in (("train", "train"), ("val", ds.val_split)):
        found = ds.checks[split].zero_size
        if found:
            effect = ("each is a miss no detection can match in mAP" if split == "val" else
                      f"training drops {'them' if len(found) > 1 else 'it'}")
            out.append(f"{key}: {len(found)} box{'es' * (len(found) > 1)} of zero width or height (first: {found[0]}); "
                       f"{effect}: give the object its extent or remove the line")
    return out
