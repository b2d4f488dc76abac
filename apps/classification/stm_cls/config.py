"""Argument helpers: boolean parsing, explicitly-given detection, and the digits-dataset defaults.

Imports only the standard library at module level: ``main.py --help`` builds the parser from this
module, and must not wait for torch/timm (about 20 s on a busy machine) just to print text.
"""

from __future__ import annotations

import argparse
import ast
import re

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
    from .digits import DIGITS_NUM_CLASSES, ensure_digits_dataset  # imports stm_backbones (torch): keep lazy

    args.data_path = ensure_digits_dataset()
    args.nb_classes = DIGITS_NUM_CLASSES
    args.class_names = [str(i) for i in range(DIGITS_NUM_CLASSES)]  # saved with args: predict.py's labels
    notes = [f"no --data_path: using the embedded digits dataset at {args.data_path} (nb_classes=10)"]
    for name, value in DIGITS_DEFAULTS.items():
        if name not in given:
            notes.append(f"--{name} {getattr(args, name)} -> {value}")
            setattr(args, name, value)
    for name, value in DIGITS_TRANSFORM.items():
        setattr(args, name, value)
    notes.append(f"train crop scale {DIGITS_TRANSFORM['train_crop_scale']}, no horizontal flip")
    return notes


# A bare word given as a --model_kwargs value is taken as a string (act_layer=gelu); anything else must
# be a Python literal, so that a typo such as depths=[2,2 fails instead of becoming the string "[2,2".
_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")


def parse_model_kwarg(text: str) -> tuple[str, object]:
    """``key=value`` from ``--model_kwargs``: the value is ``ast.literal_eval``'d (numbers, booleans,
    None, tuples, lists, dicts, quoted strings) or kept as a string when it is a bare word."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value with a Python identifier as key, got {text!r}")
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        if not _BARE_WORD.match(raw):
            raise argparse.ArgumentTypeError(
                f"{key}={raw!r}: not a Python literal ({type(exc).__name__}); write numbers, True/False/None, "
                f"tuples/lists like (2,2,6,2), or quote strings") from None
        value = raw
    return key, value
