"""Errors that mean "the input is wrong", as opposed to a bug: entry points report them in one line, no traceback."""


class InputError(ValueError):
    """Bad input (a file, a line, a parameter); the message names where and why."""


class NonFiniteError(InputError):
    """A run produced a NaN or an infinity (a diverged training run, damaged weights): the message names where and
    what to change. Nothing is published with it."""


def non_finite_paths(data: object, prefix: str = "") -> list[str]:
    """The key paths (`a.b[2]`) of every float in nested dicts and lists that is NaN or infinite."""
    import math

    if isinstance(data, float):
        return [] if math.isfinite(data) else [prefix or "(the value)"]
    if isinstance(data, dict):
        return [p for key, value in data.items() for p in non_finite_paths(value, f"{prefix}.{key}" if prefix
                                                                             else str(key))]
    if isinstance(data, list | tuple):
        return [p for i, value in enumerate(data) for p in non_finite_paths(value, f"{prefix}[{i}]")]
    return []


def non_finite_tensors(model, trainable_only: bool = True) -> list[str]:
    """Names of the (trainable, or all) tensors of `model` holding a NaN or an infinity (empty ZeRO-3 placeholders
    pass)."""
    return [name for name, weight in model.named_parameters()
            if (weight.requires_grad or not trainable_only) and weight.numel() and not weight.isfinite().all()]


def raise_if_diverged(stage: str, model, steps: int) -> None:
    """After the last optimizer step, which can make the weights non-finite with no loss after it to show it."""
    bad = non_finite_tensors(model)
    if bad:
        raise diverged(stage, steps, f"{len(bad)} trained tensors hold NaN or infinite values ({bad[0]}, …)")


def diverged(stage: str, step: int, what: str) -> NonFiniteError:
    """The error of a training run that met a NaN or an infinity at `step` (`what`: where)."""
    return NonFiniteError(f"{stage}: training diverged at step {step}: {what}; nothing was published. Lower "
                          f"{stage}.lr (or check the data), then rerun")
