"""Argument helpers: boolean parsing, explicitly-given detection, and the digits-dataset defaults."""

from __future__ import annotations

import argparse

from .digits import DIGITS_NUM_CLASSES, ensure_digits_dataset

TRUE_STRINGS = {"yes", "true", "t", "y", "1"}
FALSE_STRINGS = {"no", "false", "f", "n", "0"}

# Defaults that replace the ImageNet recipe's when no --data_path is given (embedded digits data),
# unless the flag is on the command line. The recipe's values (300 epochs at 224 px, batch 1024,
# 20 warmup epochs, mixup/cutmix/RandAugment/erasing, EMA 0.9999) would not learn anything from
# 1,437 tiny images within minutes on a CPU.
DIGITS_DEFAULTS = {
    "input_size": 32,
    "batch_size": 64,
    "epochs": 5,
    "lr": 4e-3,
    "warmup_epochs": 1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "aa": "none",
    "reprob": 0.0,
    "model_ema_decay": 0.98,
    "num_workers": 0,  # 32 px PNGs decode in well under a millisecond; worker processes would only compete
}
# Not command-line flags: milder random crops and no horizontal flip (a mirrored digit is another symbol).
DIGITS_TRANSFORM = {"train_crop_scale": (0.6, 1.0), "train_hflip": 0.0}


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (yes/no/true/false/1/0), got {value!r}")


def explicit_dests(build_parser, argv) -> set[str]:
    """Names of the options present on the command line (a second parser whose defaults are suppressed)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))


def apply_digits_defaults(args, given: set[str]) -> list[str]:
    """Point args at the embedded digits dataset and switch the defaults the user did not set.

    Returns human-readable notes of what was changed (printed by main).
    """
    args.data_path = ensure_digits_dataset()
    args.nb_classes = DIGITS_NUM_CLASSES
    notes = [f"no --data_path: using the embedded digits dataset at {args.data_path} (nb_classes=10)"]
    for name, value in DIGITS_DEFAULTS.items():
        if name not in given:
            notes.append(f"--{name} {getattr(args, name)} -> {value}")
            setattr(args, name, value)
    for name, value in DIGITS_TRANSFORM.items():
        setattr(args, name, value)
    notes.append(f"train crop scale {DIGITS_TRANSFORM['train_crop_scale']}, no horizontal flip")
    return notes
