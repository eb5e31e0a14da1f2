"""IPCL models (Konkle & Alvarez, instance-prototype contrastive learning; the seed open_ipcl).

``alexnet_gn`` is the architecture (AlexNet with GroupNorm conv blocks and an l2-normalised
128-d head); ``ipcl1`` … ``ipcl16`` are the released configurations of the paper's
Supplementary Table 1, with their metadata (``layertap models --source ipcl``). Layer names are
the paper's: ``conv_block_1`` … ``conv_block_5``, ``ave_pool``, ``fc6``, ``fc7``, ``fc8``,
``l2norm``, so ``FeatureExtractor(model, ['fc7', 'fc8', 'l2norm'])`` becomes
``lt.Extractor(model, ['fc7', 'fc8', 'l2norm'])``.

Two transforms: ``transform="stimulus"`` (default; Resize(224) + CenterCrop(224), which keeps the
whole object of a centred stimulus) and ``transform="validation"`` (Resize(256) + CenterCrop(224),
the usual ImageNet evaluation crop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from layertap.errors import LayertapError, UnavailableError, close_matches
from layertap.hashing import file_sha256
from layertap.models.registry import Built, Source, register_source
from layertap.models.weights import (
    Pretrained,
    Random,
    Weights,
    apply_state_dict,
    read_state_dict,
    seeded_build,
    weights_provenance,
    weights_unavailable,
)

URL_ROOT = "https://visionlab-pretrainedmodels.s3.amazonaws.com/project_instancenet"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
SET2 = ([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])


def _cfg(
    ref: int,
    kind: str,
    data: str,
    details: str,
    file: str | None,
    stats: tuple,
    out_dim: int = 128,
    folder: str = "ipcl",
    knn: float | None = None,
    linear: float | None = None,
) -> dict[str, Any]:
    return {
        "ref": ref,
        "type": kind,
        "training_data": data,
        "details": details,
        "url": f"{URL_ROOT}/{folder}/{file}" if file else None,
        "mean": stats[0],
        "std": stats[1],
        "out_dim": out_dim,
        "l2norm": kind != "category supervised",
        "top1_knn": knn,
        "top1_linear": linear,
    }


_S1 = "06_instance_imagenet_AlexNet_n5_lr03_pct40_t07_div1000_e100_bs128_bm20_gn_{}_final_weights_only.pth.tar"
_SUP = "alexnet_gn_s1000_imagenet_base_aug3_blur0_rot0_w0_d0_std02{}_final_weights_only.pth.tar"
CONFIGS: dict[str, dict[str, Any]] = {
    "ipcl1": _cfg(1, "ipcl", "ImageNet", "primary model", _S1.format("stack"), IMAGENET, knn=38.4, linear=39.5),
    "ipcl2": _cfg(
        2, "ipcl", "ImageNet", "variation: new code base", _S1.format("rep2"), IMAGENET, knn=38.4, linear=39.7
    ),
    "ipcl3": _cfg(
        3,
        "ipcl",
        "ImageNet",
        "variation: one cycle lr & momentum (73 epochs)",
        "alexnet_gn_dim128_unsupervised_redux_checkpoint_weights_only.pth.tar",
        IMAGENET,
        knn=35.4,
        linear=35.7,
    ),
    "ipcl4": _cfg(
        4,
        "ipcl",
        "ImageNet",
        "variation: explore ranger (82 epochs)",
        "alexnet_gn_dim128_unsupervised_ranger_checkpoint_weights_only.pth.tar",
        IMAGENET,
        knn=37.5,
        linear=32.2,
    ),
    "ipcl5": _cfg(
        5,
        "ipcl",
        "ImageNet",
        "variation: custom transforms (82 epochs)",
        "alexnet_gn_dim128_unsupervised_transforms_checkpoint_weights_only.pth.tar",
        IMAGENET,
        knn=36.9,
        linear=38.5,
    ),
    "ipcl6": _cfg(
        6,
        "ipcl",
        "ImageNet",
        "ImageNet baseline with new augmentations",
        "alexnet_gn_u128_imagenet_final_weights_only.pth.tar",
        SET2,
        knn=35.1,
    ),
    "ipcl7": _cfg(
        7,
        "ipcl",
        "OpenImagesV6",
        "train on independent object dataset, OpenImagesV6",
        "alexnet_gn_u128_openimagesv6_final_weights_only.pth.tar",
        SET2,
        knn=33.3,
    ),
    "ipcl8": _cfg(
        8,
        "ipcl",
        "Places2",
        "train on scene dataset, Places2",
        "alexnet_gn_u128_places2_final_weights_only.pth.tar",
        SET2,
        knn=30.9,
    ),
    "ipcl9": _cfg(
        9,
        "ipcl",
        "VGGFace2",
        "train on face dataset, VggFace2",
        "alexnet_gn_u128_vggface2_lr001_final_weights_only.pth.tar",
        SET2,
        knn=12.4,
    ),
    "ipcl10": _cfg(
        10,
        "ipcl",
        "Faces+Places+Objects (1x ImageNet size)",
        "train on faces-places-objects-1x-ImageNet",
        "alexnet_gn_u128_FacesPlacesObjects1281167_final_weights_only.pth.tar",
        SET2,
        knn=31.6,
    ),
    "ipcl11": _cfg(
        11,
        "ipcl",
        "Faces+Places+Objects (3x ImageNet size)",
        "train on faces-places-objects-3x-ImageNet",
        "alexnet_gn_u128_FacesPlacesObjects1281167x3_final_weights_only.pth.tar",
        SET2,
        knn=33.9,
    ),
    "ipcl12": _cfg(
        12,
        "category supervised",
        "ImageNet",
        "trained with 5 augmentations per image to match IPCL",
        "alexnet_gn_s1000_imagenet_wus_aug_final_weights_only.pth.tar",
        IMAGENET,
        1000,
        knn=58.8,
        linear=55.7,
    ),
    "ipcl13": _cfg(
        13,
        "category supervised",
        "ImageNet",
        "trained with single augmentation per image",
        "alexnet_gn_supervised_final.pth.tar",
        IMAGENET,
        1000,
        folder="wusnet",
        knn=55.5,
        linear=54.5,
    ),
    "ipcl14": _cfg(
        14,
        "category supervised",
        "ImageNet",
        "ImageNet baseline with new augmentations",
        _SUP.format(""),
        SET2,
        1000,
        knn=56.0,
    ),
    "ipcl15": _cfg(15, "category supervised", "ImageNet", "primary model", _SUP.format("_rep1"), SET2, 1000, knn=56.0),
    "ipcl16": _cfg(
        16, "untrained", "none", "untrained model with random weights and biases", None, IMAGENET, knn=3.5, linear=7.2
    ),
}
TRANSFORMS = {"stimulus": (224, 224), "validation": (256, 224)}


class L2Norm(nn.Module):
    """Divide each row by its l2 norm (the IPCL embedding lives on the unit sphere).

    Example:
        >>> L2Norm()(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, pool: bool) -> nn.Sequential:
    parts: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.GroupNorm(32, cout), nn.ReLU(True)]
    if pool:
        parts.append(nn.MaxPool2d(3, 2))
    return nn.Sequential(*parts)


def _fc(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(True))


class AlexNetGN(nn.Module):
    """AlexNet with GroupNorm (32 groups) after each conv, BatchNorm in fc6/fc7, an ``out_dim`` head
    and (for IPCL) l2 normalisation. Parameter names match the released checkpoints.

    Example:
        >>> AlexNetGN(out_dim=128).eval()(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 128])
    """

    def __init__(self, out_dim: int = 128, l2norm: bool = True) -> None:
        super().__init__()
        self.conv_block_1 = _conv(3, 96, 11, 4, 2, pool=True)
        self.conv_block_2 = _conv(96, 256, 5, 1, 2, pool=True)
        self.conv_block_3 = _conv(256, 384, 3, 1, 1, pool=False)
        self.conv_block_4 = _conv(384, 384, 3, 1, 1, pool=False)
        self.conv_block_5 = _conv(384, 256, 3, 1, 1, pool=True)
        self.ave_pool = nn.AdaptiveAvgPool2d((6, 6))
        self.fc6 = _fc(256 * 6 * 6, 4096)
        self.fc7 = _fc(4096, 4096)
        self.fc8 = nn.Sequential(nn.Linear(4096, out_dim))
        self.l2norm = L2Norm() if l2norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.conv_block_1, self.conv_block_2, self.conv_block_3, self.conv_block_4, self.conv_block_5):
            x = block(x)
        x = self.fc8(self.fc7(self.fc6(torch.flatten(self.ave_pool(x), 1))))
        return self.l2norm(x) if self.l2norm is not None else x


def ipcl_transform(kind: str, mean: list[float], std: list[float]) -> Any:
    """An IPCL model's preprocessing.

    Args:
        kind: ``"stimulus"`` (Resize(224) + CenterCrop(224): keeps a centred stimulus whole) or ``"validation"``
            (Resize(256) + CenterCrop(224), the usual ImageNet evaluation crop).
        mean: per-channel mean of the model's training normalisation.
        std: per-channel standard deviation.

    Returns:
        PIL image -> normalised (3, 224, 224) tensor.

    Raises:
        LayertapError: an unknown kind.

    Example:
        >>> from PIL import Image
        >>> ipcl_transform("validation", IMAGENET[0], IMAGENET[1])(Image.new("RGB", (300, 260))).shape
        torch.Size([3, 224, 224])
    """
    from torchvision import transforms as T

    if kind not in TRANSFORMS:
        raise LayertapError(
            f"unknown IPCL transform '{kind}'{close_matches(kind, list(TRANSFORMS))}: stimulus or validation"
        )
    resize, crop = TRANSFORMS[kind]
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


class IPCLSource(Source):
    name = "ipcl"
    description = "IPCL AlexNet-GN models (open_ipcl): ipcl1..ipcl16 and the alexnet_gn architecture"

    def list_models(self) -> list[str]:
        return ["alexnet_gn", *CONFIGS]

    def pretrained_names(self) -> set[str]:
        return {n for n, cfg in CONFIGS.items() if cfg.get("url")}

    def model_info(self, name: str) -> dict[str, Any]:
        return dict(CONFIGS.get(name, {"type": "architecture", "details": "AlexNet-GN, 128-d l2-normalised head"}))

    def build(self, name: str, weights: Weights, seed: int, **options: Any) -> Built:
        transform_kind = options.pop("transform", "stimulus")
        cfg = CONFIGS.get(
            name,
            {
                "out_dim": options.pop("out_dim", 128),
                "l2norm": options.pop("l2norm", True),
                "mean": IMAGENET[0],
                "std": IMAGENET[1],
                "url": None,
                "type": "architecture",
            },
        )
        if options:
            raise LayertapError(f"IPCL models take only transform=stimulus|validation (got {', '.join(options)})")
        module = seeded_build(lambda: AlexNetGN(cfg["out_dim"], cfg["l2norm"]), seed)
        weights_id = None
        recorded = None
        if isinstance(weights, Pretrained) and weights.default:
            if name == "alexnet_gn":
                raise LayertapError(
                    "alexnet_gn is the bare architecture: choose ipcl1..ipcl16, a weights file or 'random'"
                )
            if cfg["url"] is None:  # ipcl16 *is* the untrained control model
                recorded = weights_provenance(Random(), seed)
            else:
                weights_id = f"{name}:{Path(cfg['url']).name}"
                apply_state_dict(module, _download(cfg["url"], name), f"ipcl:{name}")
        elif isinstance(weights, Pretrained):
            raise LayertapError(f"IPCL weights must be 'pretrained', 'random' or a checkpoint file, not '{weights.id}'")
        info = {k: cfg[k] for k in ("type", "training_data", "details", "ref") if k in cfg}
        return Built(
            module,
            ipcl_transform(transform_kind, cfg["mean"], cfg["std"]),
            (3, 224, 224),
            weights_id,
            {"ipcl": info, "ipcl_transform": transform_kind, **({"url": cfg["url"]} if weights_id else {})},
            recorded=recorded,
        )


#: sha256 prefixes of the released checkpoints: open_ipcl's hub ``hashid``s (torch hub's ``check_hash``
#: convention), so a corrupted or substituted file is never loaded as the published model
SHA256_PREFIX = {
    "ipcl1": "51bcc71556",
    "ipcl2": "a4b3151e28",
    "ipcl3": "543e478735",
    "ipcl4": "e8d0736300",
    "ipcl5": "d06507981d",
    "ipcl6": "fc6efe7bec",
    "ipcl7": "79a120b915",
    "ipcl8": "343c15875d",
    "ipcl9": "23ef0936c4",
    "ipcl10": "25e539c255",
    "ipcl11": "af6119b74a",
    "ipcl12": "3a41dd57b4",
    "ipcl13": "1ea33cba82",
    "ipcl14": "f9c1603f16",
    "ipcl15": "5b19b17783",
}


def _download(url: str, name: str) -> dict[str, torch.Tensor]:
    """The published checkpoint of ``name``: downloaded into torch hub's cache (hash-checked while
    downloading) or read from it (hash-checked before loading)."""

    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    prefix = SHA256_PREFIX.get(name)
    try:
        if not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cache), hash_prefix=prefix, progress=True)
    except Exception as err:  # noqa: BLE001 - network and disk errors all mean "not available"
        if "invalid hash value" in str(err):  # torch hub removed the download: nothing bad is cached
            raise UnavailableError(
                f"the download of {url} for ipcl:{name} does not have the published sha256 ({prefix}...): "
                "it was corrupted or the file changed; try again, or pass a checkpoint file you trust as weights"
            ) from None
        raise weights_unavailable(
            f"pretrained weights for {name}",
            err,
            f"connect to the internet once, or put {url} at {cache}, or pass the checkpoint file as weights",
        ) from None
    if prefix is not None:
        digest = file_sha256(cache)
        if not digest.startswith(prefix):
            raise UnavailableError(
                f"the cached checkpoint {cache} for ipcl:{name} has sha256 {digest[:10]}..., not the published "
                f"{prefix}...: it is damaged or another file; delete it (it is downloaded again) or pass your own "
                "checkpoint file as weights"
            )
    return read_state_dict(cache)


register_source(IPCLSource())
