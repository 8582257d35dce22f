"""shoebox-tiny: a small CLIP trained by this repository on generated scenes of coloured shapes.

It exists so that search works, and can be tested, on a machine that cannot download pretrained
weights. The product loads it through open_clip exactly like any other model: `register()` adds the
shipped config to open_clip's registry and the shipped weights file is passed as the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "shoebox-tiny"
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_PATH = PACKAGE_DIR / f"{MODEL_NAME}.json"
WEIGHTS_PATH = PACKAGE_DIR / f"{MODEL_NAME}.safetensors"


def register() -> None:
    """Make `shoebox-tiny` known to open_clip (idempotent)."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)
