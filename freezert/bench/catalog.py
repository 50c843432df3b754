"""What the command line needs before torch is imported: built-in models, variants, default depths, bench modes."""

FULL, NAIVE, FREEZERT = "full fine-tune", "naive freeze", "freezert"
VARIANTS = (FULL, NAIVE, FREEZERT)
MODELS = ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x", "cnn", "encoder")
YOLOS = tuple(m for m in MODELS if m.startswith("yolov5"))
DEFAULT_FREEZE = {"cnn": 3, "encoder": 6}  # yolov5*: 10 (the backbone)


def options_mode(args) -> bool:
    """``bench`` on the user's model (``--input``, or a model that is not a built-in YOLOv5): each wrap() option
    against naive freezing, not the built-in YOLO comparison; never with ``--cache``."""
    return (
        args.command == "bench"
        and not args.cache
        and (args.input is not None or (args.model is not None and args.model not in YOLOS))
    )
