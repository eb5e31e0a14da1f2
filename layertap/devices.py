"""Which torch device a job runs on: the one place that turns ``"auto"``, ``"cuda:1"`` … into a checked device."""

from __future__ import annotations

import torch

from layertap.errors import LayertapError, option_spelling


def mps_available() -> bool:
    """Whether Apple's Metal backend (MPS) can be used (False on torch builds without it)."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device that exists on this machine.

    Args:
        device: ``"auto"`` (or None) picks cuda, then mps, then cpu; otherwise a device name
            (``cpu``, ``cuda``, ``cuda:N``, ``mps``) or a ``torch.device``, checked to be available.

    Returns:
        The ``torch.device``.

    Raises:
        LayertapError: an unknown device name, a device type layertap does not run on, or a
            device this machine does not have.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LayertapError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise LayertapError(f"{option_spelling('device', device)}: layertap runs on cpu, cuda, cuda:N or mps (or auto)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayertapError(f"{option_spelling('device', 'cuda')} asked for, but no CUDA GPU is available; use {option_spelling('device', 'cpu')} or auto")
    if dev.type == "mps" and not mps_available():
        raise LayertapError(f"{option_spelling('device', 'mps')} asked for, but MPS is not available; use {option_spelling('device', 'cpu')} or auto")
    return dev
