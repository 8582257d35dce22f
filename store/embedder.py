"""The CLIP embedder: one open_clip model, its preprocessing and tokenizer behind a small interface.

Everything that needs a vector goes through `Embedder`, so the store, tools and tests never touch
torch directly. Calls are synchronous and CPU-bound: async callers run them in an executor
(`Library` does), so the event loop never waits on a forward pass.

Torch's work on all the model's threads happens on one thread that the embedder owns, whoever
calls it. OpenMP gives every thread that starts parallel work its own team of workers; once two
teams exist on a two-core machine, libgomp counts more threads than cores and stops spinning at
its barriers, and every layer then waits on a sleeping thread: one text query measured 26 ms
instead of 14 ms when the model was loaded on one thread and queried from another. What runs on
a caller's thread runs with that thread's OpenMP limit lowered (`store.resample`): the resize and
crop for the model with one thread, so decoding threads stay parallel without a team of their
own, and the indexer's side-by-side passes (`embed_preprocessed_in_lane`) with their share of the
threads, which is one each on two cores.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np
from PIL import Image

from store.settings import TINY_MODEL, ClipSettings

if TYPE_CHECKING:
    from store.resample import Filter

log = logging.getLogger(__name__)

Vector = np.ndarray  # float32, shape (dim,) or (n, dim), rows L2-normalised
T = TypeVar("T")

# `precision=auto` keeps bfloat16 weights only when their vectors agree with fp32 this closely
# on the probe inputs (cosine): close enough that rankings do not change in practice.
BF16_MIN_COSINE = 0.999


class ModelUnavailable(RuntimeError):
    """The configured CLIP weights could not be loaded; the message tells the user what to set."""


@runtime_checkable
class Embedder(Protocol):
    """What the rest of Shoebox needs from a CLIP model."""

    model_id: str
    dim: int

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere torch
    emulates it, and bf16 is slower than fp32 rather than about twice as fast."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _probe_picture() -> Image.Image:
    """A fixed, structured picture (gradients in three channels) to compare precisions on."""
    ramp = Image.linear_gradient("L").resize((256, 256))
    return Image.merge("RGB", (ramp, Image.radial_gradient("L").resize((256, 256)), ramp.rotate(90)))


def describe_model(settings: ClipSettings) -> str:
    """A stable id for the weights in use, so vectors from different weights are never mixed."""
    if settings.checkpoint is not None:
        return f"{settings.model}/file-{_file_digest(settings.checkpoint)}"
    if settings.model == TINY_MODEL and not settings.pretrained:
        from store import tinyclip

        return f"{settings.model}/{_file_digest(tinyclip.WEIGHTS_PATH)}"
    return f"{settings.model}/{settings.pretrained or 'random-init'}"


def _unavailable_message(settings: ClipSettings, error: BaseException) -> str:
    if settings.model == TINY_MODEL and not settings.checkpoint and not settings.pretrained:
        return (
            f"The weights of the bundled '{TINY_MODEL}' model are missing from this installation "
            f"({error}). Reinstall Shoebox, or retrain them with `python -m store.tinyclip.train`."
        )
    what = (
        f"checkpoint {settings.checkpoint}"
        if settings.checkpoint
        else f"pretrained weights '{settings.pretrained}'"
    )
    return (
        f"Could not load the CLIP model '{settings.model}' ({what}): {error}. "
        "Shoebox downloads pretrained weights from the model hub on first use; if this machine is "
        "offline, download them elsewhere and set SHOEBOX_CLIP_CHECKPOINT=/path/to/weights (with "
        "SHOEBOX_CLIP_MODEL naming the matching architecture), or set SHOEBOX_CLIP_MODEL=shoebox-tiny "
        "to use the small model shipped with Shoebox (it only knows coloured shapes)."
    )


@dataclass(frozen=True)
class _CropSteps:
    """open_clip's usual pixel steps, `Resize(side)` then `CenterCrop(crop)`, and the
    mean/std of its final ToTensor + Normalize."""

    side: int
    crop: tuple[int, int]
    mode: "Filter"
    mean: Any
    std: Any


def _crop_steps(preprocess: Any) -> _CropSteps | None:
    """Recognise open_clip's transform (resize the short side, centre crop, RGB, ToTensor,
    Normalize) so it can run on torch's uint8 kernels; None for any other shape, which then
    runs as open_clip wrote it, on the torch thread."""
    import torch
    from torchvision import transforms

    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 4:
        return None
    resize, crop, *middle, to_tensor, normalize = steps
    size = resize.size if isinstance(resize, transforms.Resize) else None
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    mode = getattr(getattr(resize, "interpolation", None), "value", None)
    if (
        not isinstance(size, int)
        or mode not in ("bicubic", "bilinear")
        or resize.max_size is not None
        or resize.antialias is False
        or not isinstance(crop, transforms.CenterCrop)
        or not all(type(step).__name__ in ("MaybeConvertMode", "function") for step in middle)
        or not isinstance(to_tensor, transforms.ToTensor)
        or not isinstance(normalize, transforms.Normalize)
    ):
        return None
    crop_size = tuple(int(v) for v in crop.size)
    if len(crop_size) != 2 or crop_size[0] > size or crop_size[1] > size:
        return None
    return _CropSteps(
        side=size,
        crop=(crop_size[0], crop_size[1]),
        mode=mode,  # type: ignore[arg-type]
        mean=torch.tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1),
        std=torch.tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1),
    )


class ClipEmbedder:
    """open_clip model + transforms on the CPU. Thread-safe: one pass at a time on the torch
    thread, and lane passes beside it on their callers' threads."""

    def __init__(self, settings: ClipSettings) -> None:
        self.settings = settings
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoebox-torch")
        self._worker_thread: threading.Thread | None = None
        try:
            self._worker.submit(self._load, settings).result()
        except BaseException:
            self._worker.shutdown(wait=False)
            raise

    def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the embedder's torch thread (directly when already on it)."""
        if threading.current_thread() is self._worker_thread:
            return fn(*args)
        return self._worker.submit(fn, *args).result()

    def _load(self, settings: ClipSettings) -> None:
        import open_clip
        import torch

        self._worker_thread = threading.current_thread()
        self._torch = torch
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self._threads = torch.get_num_threads()
        weights: str | None = settings.pretrained
        if settings.checkpoint is not None:
            if not settings.checkpoint.is_file():
                raise ModelUnavailable(
                    _unavailable_message(settings, FileNotFoundError("no such file"))
                )
            weights = str(settings.checkpoint)
        if settings.model == TINY_MODEL:
            from store import tinyclip

            tinyclip.register()
            if weights is None:
                weights = str(tinyclip.WEIGHTS_PATH)
        if settings.model not in open_clip.list_models():
            raise ModelUnavailable(
                f"Unknown CLIP model '{settings.model}'. Set SHOEBOX_CLIP_MODEL to one of open_clip's "
                "models (for example ViT-B-32) or to shoebox-tiny."
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                settings.model, pretrained=weights, device="cpu"
            )
            tokenizer = open_clip.get_tokenizer(settings.model)
        except Exception as error:  # hub errors come in many types; all mean the same to a user
            raise ModelUnavailable(_unavailable_message(settings, error)) from error
        model.eval()
        self._dtype = torch.float32
        self._model = model
        self._preprocess = preprocess
        self._crop = _crop_steps(preprocess)
        self._tokenizer = tokenizer
        self._trim_ok = False
        try:
            self._trim_ok = self._trim_is_exact()
        except Exception as error:  # a model shape we do not know: just use the full pass
            log.debug("Text padding shortcut disabled: %s", error)
        self.precision = "fp32"
        agreement = ""
        if settings.precision == "bf16":
            self._model = model.to(torch.bfloat16)
            self._dtype, self.precision = torch.bfloat16, "bf16"
        elif settings.precision == "auto" and cpu_has_native_bf16():
            cosine = self._try_bf16()
            agreement = f", cosine {cosine:.5f} against fp32"
        self.model_id = describe_model(settings)
        self.dim = int(self._probe_dim())
        log.info("Loaded CLIP %s (%d-d, %s%s)", self.model_id, self.dim, self.precision, agreement)

    def _try_bf16(self) -> float:
        """Switch to bfloat16 weights if they give the same vectors as fp32 on the probes (about
        twice the speed on a CPU that has bf16 instructions); returns the lowest cosine seen."""
        torch = self._torch
        texts = ["a photo of a dog on the beach", "red", "two people hugging in the snow"]
        picture = self._preprocess(_probe_picture()).unsqueeze(0)  # on the torch thread already
        reference = np.vstack([self.embed_texts(texts), self.embed_tensors(picture)])
        fp32_model = self._model
        self._model, self._dtype = copy.deepcopy(fp32_model).to(torch.bfloat16), torch.bfloat16
        candidate = np.vstack([self.embed_texts(texts), self.embed_tensors(picture)])
        cosine = float(np.min(np.sum(reference * candidate, axis=1)))
        if cosine >= BF16_MIN_COSINE:
            self.precision = "bf16"
        else:
            self._model, self._dtype = fp32_model, torch.float32
            log.info("Staying in fp32: bf16 vectors differ too much (cosine %.5f)", cosine)
        return cosine

    def _probe_dim(self) -> int:
        return self.embed_texts(["a photo"]).shape[1]

    @property
    def image_size(self) -> int:
        size = getattr(self._model.visual, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def preprocess(self, image: Image.Image) -> "object":
        """Prepare one RGB image for `embed_preprocessed` (thread-safe, any thread)."""
        if self._crop is None:
            return self._on_worker(self._preprocess, image)
        from store import resample

        rgb = image if image.mode == "RGB" else image.convert("RGB")  # as open_clip converts
        return self.preprocess_pixels(resample.as_tensor(rgb))

    def preprocess_pixels(self, pixels: "object") -> "object":
        """`preprocess` for pixels from `store.resample.as_tensor`.

        The resize and crop happen here, on the calling thread and without an OpenMP team;
        turning the pixels into a normalised tensor waits for the torch thread, where a whole
        batch is done at once.
        """
        from store import resample

        crop = self._crop
        if crop is None:
            return self._on_worker(self._preprocess, resample.to_image(pixels))  # type: ignore[arg-type]
        return resample.resize_and_center_crop(pixels, crop.side, crop.crop, crop.mode)  # type: ignore[arg-type]

    def embed_preprocessed(self, inputs: Sequence["object"]) -> np.ndarray:
        """Vectors of images already passed through `preprocess`."""
        return self._on_worker(lambda: self._embed_batch(self._batch_tensor(list(inputs))))

    def batch_tensor(self, inputs: Sequence["object"]) -> "object":
        """The model's input tensor for preprocessed images (what `embed_tensors` takes)."""
        return self._on_worker(self._batch_tensor, list(inputs))

    def _batch_tensor(self, inputs: list["object"]) -> "object":
        torch = self._torch
        if self._crop is None:
            return torch.stack(inputs)  # type: ignore[arg-type]
        # What torchvision's ToTensor and Normalize do, for the whole batch in one go.
        batch = torch.stack(inputs).to(torch.float32).div_(255)  # type: ignore[arg-type]
        return batch.sub_(self._crop.mean).div_(self._crop.std)

    def embed_tensors(self, batch: "object") -> np.ndarray:
        """Run the image tower on an already preprocessed (n, 3, H, W) tensor."""
        return self._on_worker(self._embed_batch, batch)

    def embed_preprocessed_in_lane(self, inputs: Sequence["object"], lanes: int) -> np.ndarray:
        """`embed_preprocessed` on the calling thread, with the model's threads split `lanes` ways.

        For a caller that keeps `lanes` batches in the model side by side (the indexer). On two
        cores two passes of one thread each keep both cores as busy as one pass of two, with no
        barrier inside a pass where one thread waits for the other: so the decoding, copying
        and committing of other batches can share the cores with the model without stalling it,
        which a pass on the torch thread's two-thread team cannot (see `store.library`).
        """
        with self._lane_threads(lanes):
            return self._embed_batch(self._batch_tensor(list(inputs)))

    def embed_tensors_in_lane(self, batch: "object", lanes: int) -> np.ndarray:
        """`embed_tensors` on the calling thread, with the model's threads split `lanes` ways."""
        with self._lane_threads(lanes):
            return self._embed_batch(batch)

    def _lane_threads(self, lanes: int) -> "AbstractContextManager[None]":
        from store import resample

        return resample.openmp_threads(max(1, self._threads // max(1, lanes)))

    def _embed_batch(self, batch: "object") -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            features = self._model.encode_image(batch.to(self._dtype))
        return _normalise(features.float().numpy())

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        size = self.settings.batch_size
        chunks = []
        for start in range(0, len(images), size):
            chunks.append(self.embed_preprocessed([self.preprocess(im) for im in images[start : start + size]]))
        return np.concatenate(chunks, axis=0)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        return self._on_worker(self._embed_texts, list(texts))

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        tokens = self._tokenizer(texts)
        with torch.inference_mode():
            features = self._encode_text(tokens)
        return _normalise(features.float().numpy())

    def _encode_text(self, tokens: "object") -> "object":
        """The text tower, skipping the padding after the longest query when that is exact.

        Queries are a few tokens long but the tower pads them to its full context (77 for most
        models). With a causal mask and end-of-text pooling, positions after the end-of-text token
        never influence it, so running only the used prefix gives the same vector for a fraction
        of the work. `_trim_is_exact` checks this once at load time; otherwise the full pass runs.
        """
        model = self._model
        used = int((tokens != 0).nonzero()[:, 1].max().item()) + 1 if bool((tokens != 0).any()) else 1
        if not getattr(self, "_trim_ok", False) or used >= tokens.shape[1]:
            return model.encode_text(tokens)
        from open_clip.transformer import text_global_pool

        tokens = tokens[:, :used]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:used].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:used, :used])
        x = model.ln_final(x)
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, self._torch.nn.Linear) else x @ projection
        return x

    def _trim_is_exact(self) -> bool:
        import open_clip

        model = self._model
        if type(model) is not open_clip.CLIP or getattr(model, "attn_mask", None) is None:
            return False
        if getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
            return False
        probe = self._tokenizer(["a photo of a dog on the beach", "red"])
        with self._torch.inference_mode():
            full = model.encode_text(probe).float().numpy()
            self._trim_ok = True
            try:
                trimmed = self._encode_text(probe).float().numpy()
            finally:
                self._trim_ok = False
        cosine = np.sum(_normalise(full) * _normalise(trimmed), axis=1)
        return bool(np.all(cosine > 0.9999))


def load_embedder(settings: ClipSettings | None = None) -> ClipEmbedder:
    """Load the configured model, raising `ModelUnavailable` with advice when it cannot be had."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return ClipEmbedder(settings or ClipSettings.from_env())
