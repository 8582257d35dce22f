"""Train shoebox-tiny from scratch on generated scenes, on the CPU, with open_clip's own pieces.

    python -m store.tinyclip.train [--steps N --batch B --seed S --out PATH]

The model comes from `open_clip.create_model_and_transforms("shoebox-tiny", pretrained=None)`,
images go through that call's training transform, the objective is open_clip's `ClipLoss` (with
`same_subject_loss` beside it, for image-to-image search), and the result is saved as fp16
safetensors that `open_clip` loads as a checkpoint: nothing here is a private re-implementation of
CLIP, so the product can load the weights like any other model's.

Scenes are rendered on the fly from numpy generators seeded by (seed, step, slot), so a run is
reproducible from its seed; see `SceneStream` for how batches are composed (an easy-to-hard
curriculum, one-colour steps and contrast twins) and why.

A step runs the forward pass under bfloat16 autocast and leaves the token embedding table at its
random start (see `train`): together they make a step about a fifth cheaper on 2 cores, which
buys the extra steps that lift every held-out figure within the same half hour.

The vision tower is a small convolutional one (open_clip's ModifiedResNet, as in CLIP's RN50,
at 64 px and width 16). A 4-layer ViT of the same budget was tried first: on these scenes it
learned colours within a few hundred steps but no shapes at all in 1000 steps (shape retrieval at
chance), because without convolution it has to learn every shape at every position separately.
The ResNet also makes a step about twice as cheap on a CPU. The text tower has two layers:
captions are a handful of words from a vocabulary of about twenty, and a four-layer tower cost
twice the text time (157 ms against 75 ms per batch of 128, forward and backward) for steps that
are better spent on pictures.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from store import tinyclip
from store.tinyclip.evaluate import TorchEmbedder, evaluate, format_figures
from store.tinyclip.scenes import (
    COLOURS,
    SHAPES,
    SUBJECTS,
    SceneObject,
    SceneSpec,
    caption,
    random_spec,
    render_scene,
)

# Pictures are rendered at a random side and resized to the model's 64 px by the transform, so
# the model sees both crisp small renders and downscaled large ones (as real uploads would be).
RENDER_SIDES: tuple[int, ...] = (64, 80, 96, 112, 128)
SINGLE_FRACTION = 0.4
# The shipped weights' recipe; `SceneStream` explains each knob.
TWINS: tuple[float, float, float] = (0.15, 0.05, 0.15)  # shape, colour, binding twins
MONO = 0.35  # fraction of one-colour steps
CURRICULUM: tuple[float, float] = (0.15, 0.5)  # easy pictures until, full variety from
SAME_SUBJECT = 1.5  # weight of `same_subject_loss` beside ClipLoss

# Class index of each single-object (colour, shape) pair, the label `same_subject_loss` uses.
_CLASSES: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(SUBJECTS)}
NO_LABEL = -1


def subject_label(spec: SceneSpec) -> int:
    """The (colour, shape) class of a one-object scene; NO_LABEL for two objects."""
    if len(spec.objects) != 1:
        return NO_LABEL
    obj = spec.objects[0]
    return _CLASSES[(obj.colour, obj.shape)]


def same_subject_loss(features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Pull pictures of the same colour and shape together, whatever their size, place or backdrop.

    ClipLoss only asks each picture to be nearer its own caption than the batch's other captions;
    two pictures of a red star remain free to sit far apart along size, position and background,
    and image-to-image search ("find photos like this one") sees exactly that spread: a small red
    star's nearest pictures were often small red circles. This is the supervised contrastive loss
    of Khosla et al. (2020) over the one-object pictures of the batch, at CLIP's temperature:
    for every picture with a same-class partner in the batch, the mean log-probability of its
    partners among all other pictures.
    """
    mask = labels != NO_LABEL
    if int(mask.sum()) < 2:
        return features.new_zeros(())
    f, lab = features[mask], labels[mask]
    others = ~torch.eye(len(lab), dtype=torch.bool)
    logits = (logit_scale * f @ f.T).masked_fill(~others, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    partners = (lab[:, None] == lab[None, :]) & others
    anchors = partners.any(dim=1)
    if not bool(anchors.any()):
        return features.new_zeros(())
    per_anchor = -(log_prob.masked_fill(~partners, 0.0)).sum(dim=1)[anchors] / partners.sum(dim=1)[anchors]
    return per_anchor.mean()


def _swapped(spec: SceneSpec) -> SceneSpec | None:
    """The same layout with the two colours exchanged, or None when that changes nothing."""
    a, b = spec.objects
    if a.colour == b.colour or a.shape == b.shape:
        return None
    return SceneSpec(
        [
            SceneObject(b.colour, a.shape, a.size, a.position),
            SceneObject(a.colour, b.shape, b.size, b.position),
        ]
    )


class SceneStream(Dataset):
    """Item `index` is a transformed picture, a caption and the picture's `subject_label`, fixed
    by (seed, index).

    Items are laid out batch by batch. The first half of each batch is freshly drawn scenes; the
    second half shows the previous batch's fresh scenes again, with a new crop and a new phrasing
    of the caption. Rendering is half of the CPU cost of a step, so this buys twice the steps for
    the same time while every picture is still seen in two different ways.

    Three things keep a model trained from scratch from settling on colour alone (colour
    separates most of a batch, and a fresh ViT finds it long before it finds shapes; once both
    towers ignore shape, nothing pushes them back):
    - a curriculum: the run starts on easy pictures (one big object, plain grey backdrop, no
      artefacts) and ramps up to the full variety of `render_scene`;
    - one-colour steps, where only shape, size and position tell the pictures apart;
    - contrast twins in fresh slots (2k, 2k+1): one object that differs only in shape or only in
      colour, or two objects whose colours are swapped (which also teaches which colour belongs
      to which shape)."""

    def __init__(
        self,
        seed: int,
        batch: int,
        steps: int,
        transform: Any,
        twins: tuple[float, float, float] = TWINS,
        mono: float = MONO,
        curriculum: tuple[float, float] = CURRICULUM,
    ) -> None:
        if batch % 2:
            raise ValueError("the batch size must be even")
        self.seed = seed
        self.batch = batch
        self.steps = steps
        self.length = batch * steps
        self.transform = transform
        self.shape_twins, self.colour_twins, self.binding_twins = twins
        self.mono = mono
        self.easy_until, self.ramp_until = curriculum
        self._cache: dict[tuple[int, int, int], Any] = {}

    def __len__(self) -> int:
        return self.length

    def scene_key(self, index: int) -> tuple[int, int, int]:
        """(kind, step, slot) of the scene shown by item `index`: kind 0 is a step's fresh half,
        kind 1 fills the second half of the very first batch, which has nothing to repeat."""
        step, slot = divmod(index, self.batch)
        half = self.batch // 2
        if slot < half:
            return (0, step, slot)
        if step == 0:
            return (1, 0, slot - half)
        return (0, step - 1, slot - half)

    def difficulty(self, step: int) -> float:
        """0 for the easy start of the run, rising linearly to 1 (full variety)."""
        start, end = self.easy_until * self.steps, self.ramp_until * self.steps
        if step < start:
            return 0.0
        if step >= end or end <= start:
            return 1.0
        return (step - start) / (end - start)

    def batch_colour(self, kind: int, step: int) -> str | None:
        """The one colour of a one-colour step, or None for an ordinary step."""
        rng = np.random.default_rng([self.seed, kind, step, 5])
        if rng.random() >= self.mono:
            return None
        return COLOURS[int(rng.integers(len(COLOURS)))]

    def spec_for(self, key: tuple[int, int, int]) -> SceneSpec:
        """The scene behind a scene key (separate from rendering so it can be inspected)."""
        kind, step, slot = key
        rng = np.random.default_rng([self.seed, kind, step, slot, 2])
        colour = self.batch_colour(kind, step)
        if rng.random() >= self.difficulty(step):
            # easy: a single big object
            obj = random_spec(rng, 1, colours=(colour,) if colour else None).objects[0]
            return SceneSpec([obj._replace(size="big")])
        if colour is not None:
            return random_spec(rng, 1 if rng.random() < SINGLE_FRACTION else 2, colours=(colour,))
        pair_rng = np.random.default_rng([self.seed, kind, step, slot - slot % 2, 1])
        u = pair_rng.random()
        first = slot % 2 == 0
        if u < self.shape_twins + self.colour_twins:
            obj = random_spec(pair_rng, 1).objects[0]
            if u < self.shape_twins:
                others = [s for s in SHAPES if s != obj.shape]
                other = obj._replace(shape=others[int(pair_rng.integers(len(others)))])
            else:
                others = [c for c in COLOURS if c != obj.colour]
                other = obj._replace(colour=others[int(pair_rng.integers(len(others)))])
            return SceneSpec([obj if first else other])
        if u < self.shape_twins + self.colour_twins + self.binding_twins:
            spec = random_spec(pair_rng, 2)
            twin = _swapped(spec)
            if twin is not None:
                return spec if first else twin
        return random_spec(rng, 1 if rng.random() < SINGLE_FRACTION else 2)

    def _picture(self, key: tuple[int, int, int], spec: SceneSpec) -> Any:
        image = self._cache.get(key)
        if image is None:
            rng = np.random.default_rng([self.seed, *key, 3])
            side = RENDER_SIDES[int(rng.integers(len(RENDER_SIDES)))]
            image = render_scene(spec, rng, size=side, difficulty=self.difficulty(key[1]))
            self._cache[key] = image
            if len(self._cache) > 2 * self.batch:  # only the previous step's scenes recur
                for stale in [k for k in self._cache if k[0] == 1 or k[1] < key[1] - 1]:
                    del self._cache[stale]
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        key = self.scene_key(index)
        spec = self.spec_for(key)
        image = self._picture(key, spec)
        text = caption(spec, np.random.default_rng([self.seed, index, 4]))
        return self.transform(image), text, subject_label(spec)


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (as open_clip's own training does): gains, biases,
    embeddings and the temperature are left alone."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: the usual CLIP schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> int:
    """Write the state dict as fp16 safetensors (half the size, no measurable loss for
    retrieval; integer buffers such as batch-norm counters stay integers); open_clip casts it
    back to the model's dtype on load. Returns the file size."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # a shipped file, readable by whoever installs it
    tmp.replace(path)
    return path.stat().st_size


def seed_everything(seed: int) -> None:
    """Seed every random source a run touches, so the same seed trains the same model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    steps: int,
    batch: int,
    seed: int,
    out: Path,
    lr: float = 1.5e-3,
    warmup: int = 60,
    weight_decay: float = 0.1,
    workers: int = 1,
    threads: int = 2,
    eval_n: int = 500,
    log_every: int = 10,
    twins: tuple[float, float, float] = TWINS,
    mono: float = MONO,
    curriculum: tuple[float, float] = CURRICULUM,
    probe_every: int = 1000,
    same_subject: float = SAME_SUBJECT,
    bf16: bool = True,
    train_token_embedding: bool = False,
) -> dict[str, float]:
    """Train, report the held-out figures, save the weights; returns the figures."""
    import open_clip
    from open_clip.loss import ClipLoss

    seed_everything(seed)
    torch.set_num_threads(threads)
    tinyclip.register()
    model, train_transform, eval_transform = open_clip.create_model_and_transforms(
        tinyclip.MODEL_NAME, pretrained=None, device="cpu"
    )
    tokenizer = open_clip.get_tokenizer(tinyclip.MODEL_NAME)
    n_params = sum(p.numel() for p in model.parameters())
    if not train_token_embedding:
        # The captions use about 25 of the tokenizer's 49,408 tokens, yet the embedding table is
        # three quarters of the parameters, and AdamW rewrites all of it every step (~15% of a
        # step). Left at its random initialisation, each word is still a distinct direction that
        # the text layers above learn to map; the saved model is an ordinary open_clip model.
        model.token_embedding.weight.requires_grad_(False)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"shoebox-tiny: {n_params / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained); "
        f"{steps} steps x batch {batch}, seed {seed}"
    )

    dataset = SceneStream(seed, batch, steps, train_transform, twins, mono, curriculum)

    def collate(
        items: Sequence[tuple[torch.Tensor, str, int]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _, _ in items])
        labels = torch.tensor([label for _, _, label in items], dtype=torch.long)
        return images, tokenizer([text for _, text, _ in items]), labels

    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6
    )
    loss_fn = ClipLoss()
    model.train()
    started = time.monotonic()
    running = 0.0
    for step, (images, texts, labels) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr, warmup)
        # bfloat16 matmuls make a step about a sixth cheaper on CPUs with bf16 instructions; the
        # weights, the optimiser and the losses stay in fp32 (autocast only lowers the layers).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image_features, text_features, logit_scale = model(images, texts)
        image_features, text_features = image_features.float(), text_features.float()
        loss = loss_fn(image_features, text_features, logit_scale)
        if same_subject:
            loss = loss + same_subject * same_subject_loss(image_features, labels, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # open_clip's training clamps the temperature the same way
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        done = step + 1
        if done % log_every == 0 or done == steps:
            elapsed = time.monotonic() - started
            print(
                f"step {done:5d}/{steps}  loss {running / ((done - 1) % log_every + 1):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  scale {model.logit_scale.exp().item():6.2f}  "
                f"elapsed {elapsed / 60:5.1f} min  ({elapsed / done:.2f} s/step, "
                f"eta {(steps - done) * elapsed / done / 60:.1f} min)",
                flush=True,
            )
            running = 0.0
        if probe_every and done % probe_every == 0 and done < steps:
            # A small held-out check, so a run that is not learning shapes shows it early.
            probe = TorchEmbedder(model, eval_transform, tokenizer, model_id="probe")
            print("  probe:", format_figures(evaluate(probe, n=200)), flush=True)
            model.train()
    train_seconds = time.monotonic() - started
    print(f"trained {steps} steps in {train_seconds / 60:.1f} min", flush=True)

    model.eval()
    embedder = TorchEmbedder(model, eval_transform, tokenizer, model_id=f"{tinyclip.MODEL_NAME}/in-memory")
    figures = evaluate(embedder, n=eval_n)
    print("held-out:", format_figures(figures), flush=True)
    size = save_weights(
        model,
        out,
        {
            "model": tinyclip.MODEL_NAME,
            "steps": str(steps),
            "batch": str(batch),
            "seed": str(seed),
            "same_subject": str(same_subject),
            "autocast": "bf16" if bf16 else "off",
            "token_embedding": "trained" if train_token_embedding else "frozen",
            "train_minutes": f"{train_seconds / 60:.1f}",
        },
    )
    print(f"saved {out} ({size / 1e6:.1f} MB)", flush=True)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train shoebox-tiny on generated scenes (CPU).")
    parser.add_argument("--steps", type=int, default=4300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=tinyclip.WEIGHTS_PATH)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1, help="scene-rendering processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the model")
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument(
        "--probe-every", type=int, default=1000, help="print a small held-out check every N steps (0: never)"
    )
    parser.add_argument(
        "--twins",
        type=float,
        nargs=3,
        default=TWINS,
        metavar=("SHAPE", "COLOUR", "BINDING"),
        help="fractions of fresh pairs that are shape / colour / binding contrast twins",
    )
    parser.add_argument("--mono", type=float, default=MONO, help="fraction of one-colour steps")
    parser.add_argument(
        "--same-subject",
        type=float,
        default=SAME_SUBJECT,
        help="weight of the loss that pulls same colour+shape pictures together (0: ClipLoss only)",
    )
    parser.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="run the forward pass in fp32 (slower; for CPUs without bfloat16 instructions)",
    )
    parser.add_argument(
        "--train-token-embedding",
        action="store_true",
        help="also train the token embedding table (left at its random start by default; slower)",
    )
    parser.add_argument(
        "--curriculum",
        type=float,
        nargs=2,
        default=CURRICULUM,
        metavar=("EASY", "FULL"),
        help="fractions of the run: easy pictures until EASY, full variety from FULL",
    )
    args = parser.parse_args(argv)
    train(
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        out=args.out,
        lr=args.lr,
        warmup=min(args.warmup, max(1, args.steps // 10)),
        workers=args.workers,
        threads=args.threads,
        eval_n=args.eval_n,
        twins=tuple(args.twins),
        mono=args.mono,
        curriculum=tuple(args.curriculum),
        same_subject=args.same_subject,
        probe_every=args.probe_every,
        bf16=args.bf16,
        train_token_embedding=args.train_token_embedding,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
