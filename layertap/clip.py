"""CLIP conveniences (the seed's ``clip`` API) on models loaded with ``load_model("clip:...")``.

model = lt.load_model("clip:ViT-B-32")            # OpenAI's weights
img = lt.clip.encode_image(model, images)         # (N, D) image embeddings
txt = lt.clip.encode_text(model, ["a dog", "a cat"], templates=["a photo of a {}"])
logits = lt.clip.similarity_logits(img, txt)       # 100 x cosine similarity, (N_images, N_texts)
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layertap._optional import require
from layertap.errors import LayertapError
from layertap.models.registry import LoadedModel, load_model
from layertap.store.files import MANIFEST, disk_error, write_json_atomic
from layertap.store.manifest import SCHEMA_VERSION

DEFAULT_TEMPLATE = "{}"
#: OpenAI's learned logit scale (exp(4.6052)) is 100; the seed documents logits as cosine x 100
LOGIT_SCALE = 100.0


def available_models() -> list[str]:
    """CLIP model names open_clip can build (pass them as ``clip:NAME``).

    Returns:
        open_clip's model names (``RN50``, ``ViT-B-32``, ...).

    Raises:
        MissingDependencyError: open_clip is not installed (``pip install 'layertap[clip]'``).

    Example:
        >>> "ViT-B-32" in available_models()  # doctest: +SKIP
        True
    """
    return list(require("open_clip", "clip").list_models())


def _clip(model: LoadedModel | str) -> LoadedModel:
    loaded = load_model(model) if isinstance(model, str) else model
    if "clip" not in loaded.components:
        raise LayertapError(f"{loaded.name} is not a CLIP model; load one with lt.load_model('clip:ViT-B-32')")
    return loaded


def tokenize(model: LoadedModel | str, texts: str | Sequence[str]) -> torch.Tensor:
    """Token ids, (N, context_length) int64: start token, text, end token, zero padding.

    Texts longer than the context (77 tokens for OpenAI's CLIP) are truncated, keeping the end token as the last
    position, exactly as open_clip's tokenizer does.

    Args:
        model: a loaded CLIP model, or its name (``"clip:ViT-B-32"``).
        texts: one text or several.

    Returns:
        The token ids, one row per text.

    Example:
        >>> tokenize(lt.load_model("clip:ViT-B-32"), ["a dog", "a cat"]).shape  # doctest: +SKIP
        torch.Size([2, 77])
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    return _clip(model).components["tokenizer"](texts)


def expand_templates(texts: Sequence[str], templates: Sequence[str] | None) -> list[list[str]]:
    """For each text, its prompts: ``templates`` with ``{}`` replaced by the text.

    Args:
        texts: the texts (class names, concept words, sentences).
        templates: prompt templates with one ``{}``; None: the text itself.

    Returns:
        One list of prompts per text.

    Example:
        >>> expand_templates(["dog"], ["a photo of a {}", "a drawing of a {}"])
        [['a photo of a dog', 'a drawing of a dog']]
    """
    templates = list(templates or [DEFAULT_TEMPLATE])
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise LayertapError(f"template '{bad[0]}' has no '{{}}' where the text goes (e.g. 'a photo of a {{}}')")
    return [[t.format(text) for t in templates] for text in texts]


@torch.inference_mode()
def encode_text(
    model: LoadedModel | str,
    texts: Sequence[str],
    templates: Sequence[str] | None = None,
    normalize: bool = True,
    batch_size: int = 256,
) -> np.ndarray:
    """Text embeddings (N, D) float32, one row per text.

    With several ``templates`` (e.g. ``["a photo of a {}", "a drawing of a {}"]``) each text's prompt embeddings
    are l2-normalised and averaged (CLIP's prompt ensembling), then normalised again if ``normalize``.

    Args:
        model: a loaded CLIP model, or its name.
        texts: the texts.
        templates: prompt templates with one ``{}`` (None: the texts as they are).
        normalize: l2-normalise each row.
        batch_size: prompts encoded per forward pass.

    Returns:
        The embeddings, one row per text.

    Example:
        >>> model = lt.load_model("clip:ViT-B-32")  # doctest: +SKIP
        >>> encode_text(model, ["a dog", "a cat"], templates=["a photo of a {}"]).shape  # doctest: +SKIP
        (2, 512)
    """
    loaded = _clip(model)
    clip = loaded.components["clip"]
    device = next(clip.parameters()).device
    prompts = expand_templates(texts, templates)
    flat = [p for group in prompts for p in group]
    chunks = []
    for i in range(0, len(flat), batch_size):
        tokens = tokenize(loaded, flat[i : i + batch_size]).to(device)
        chunks.append(clip.encode_text(tokens).float())
    emb = torch.cat(chunks) if chunks else torch.empty(0)
    k = len(prompts[0]) if prompts else 1
    if k > 1:
        emb = torch.nn.functional.normalize(emb, dim=-1).reshape(len(texts), k, -1).mean(dim=1)
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.cpu().numpy()


@torch.inference_mode()
def encode_image(model: LoadedModel | str, images: torch.Tensor | Sequence[Any], normalize: bool = False) -> np.ndarray:
    """Image embeddings (N, D) float32 for a preprocessed batch (N, 3, H, W) or a list of PIL images.

    Args:
        model: a loaded CLIP model, or its name.
        images: a batch already transformed with ``model.transform``, or PIL images (transformed here).
        normalize: l2-normalise each row.

    Returns:
        The embeddings, one row per image.

    Example:
        >>> from PIL import Image
        >>> encode_image(lt.load_model("clip:ViT-B-32"), [Image.new("RGB", (64, 64))]).shape  # doctest: +SKIP
        (1, 512)
    """
    loaded = _clip(model)
    if not isinstance(images, torch.Tensor):
        images = torch.stack([loaded.transform(img) for img in images])
    device = next(loaded.module.parameters()).device
    emb = loaded.module(images.to(device)).float()
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.cpu().numpy()


def similarity_logits(image_features: np.ndarray, text_features: np.ndarray, scale: float = LOGIT_SCALE) -> np.ndarray:
    """``scale`` x cosine similarity, (N_images, N_texts): what CLIP's forward returns as logits.

    Args:
        image_features: (N_images, D) image embeddings.
        text_features: (N_texts, D) text embeddings.
        scale: the logit scale (OpenAI's learned value is 100).

    Returns:
        The logits.

    Example:
        >>> similarity_logits(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 2.0]]))
        array([[100.,   0.]], dtype=float32)
    """
    a = np.asarray(image_features, dtype=np.float64)
    b = np.asarray(text_features, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (scale * a @ b.T).astype(np.float32)


def read_texts(path: str | os.PathLike[str], column: str | None = None) -> list[str]:
    """Texts from a .txt (one per line) or .tsv/.csv file.

    Args:
        path: the file; THINGS' ``things_concepts.tsv`` gives its concept words.
        column: the column of a table (default: Word, text, concept or name, else the first column).

    Returns:
        The texts, in the file's order.

    Raises:
        LayertapError: a missing file, an unknown column, or a table without rows.

    Example:
        >>> read_texts("things_concepts.tsv")[:2]  # doctest: +SKIP
        ['aardvark', 'abacus']
    """
    p = Path(path)
    if not p.is_file():
        raise LayertapError(f"texts file not found: {p}")
    if p.suffix.lower() not in (".tsv", ".csv"):
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    with open(p, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
    if not rows:
        raise LayertapError(f"{p} has no rows")
    cols = {c.lower(): c for c in rows[0]}
    col = column or next((cols[c] for c in ("word", "text", "concept", "name") if c in cols), next(iter(rows[0])))
    if col not in rows[0]:
        raise LayertapError(f"{p} has no column '{col}' (columns: {', '.join(rows[0])})")
    return [r[col].strip() for r in rows]


def write_text_features(
    model: LoadedModel | str,
    texts: Sequence[str],
    out: str | os.PathLike[str],
    templates: Sequence[str] | None = None,
    normalize: bool = True,
) -> Path:
    """Encode ``texts`` and write ``out/text_features.npy`` (N, D), ``out/texts.tsv`` and a manifest.

    Args:
        model: a loaded CLIP model, or its name.
        texts: the texts.
        out: the folder to write.
        templates: prompt templates (see :func:`encode_text`).
        normalize: l2-normalise each row.

    Returns:
        ``out`` as a Path.

    Example:
        >>> write_text_features("clip:ViT-B-32", ["dog", "cat"], "text-out")  # doctest: +SKIP
        PosixPath('text-out')
    """
    loaded = _clip(model)
    feats = encode_text(loaded, texts, templates, normalize)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / "text_features.npy", feats)
    with open(dest / "texts.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["row", "text"])
        w.writerows(enumerate(texts))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "layertap": "text",
        "model": loaded.provenance,
        "templates": list(templates or [DEFAULT_TEMPLATE]),
        "normalized": normalize,
        "shape": list(feats.shape),
    }
    try:
        write_json_atomic(dest / MANIFEST, manifest)  # not a run (no arrays): its own small record, same writer
    except OSError as err:
        raise disk_error(err, dest) from None
    return dest
