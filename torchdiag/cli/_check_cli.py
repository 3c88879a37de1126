"""``torchdiag check MODULE:FACTORY --input-shape 32,3,32,32``: diagnose a model of yours from the shell.

MODULE is a dotted module importable from the current directory (``models.resnet``) or a path to a
``.py`` file (``src/models.py``); FACTORY is a callable in it that returns an ``nn.Module`` (a function,
a class), or an ``nn.Module`` instance; ``A.b`` reaches an attribute of an attribute. The factory is
called with no arguments after ``torch.manual_seed(--seed)``; the input is random (standard normal for
floating dtypes, uniform integers in ``[0, --int-high)`` for integer dtypes) from a generator with the
same seed, so a run is repeatable. ``torchdiag.check`` runs one forward and backward pass on it and the
report is printed: per layer, its parameters and output shape (as Lightning's ``ModelSummary``) beside the
statistics, within 100 columns (``check_table``).

Exit status: 0 nothing flagged, 1 something flagged (``--fail-on`` restricts which problems count),
2 the model could not be checked (import error, missing attribute, a factory that fails or returns no
``nn.Module``, a bad shape or dtype, a model that fails on the input, a bad config).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .._diagnose.verdict import ERROR, FLAGGED, OK, decide
from .._report.render import use_color
from .._report.report import STATUSES, Report
from ..errors import TorchDiagError

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported once the arguments are parsed (``run_check``): --help and usage errors answer without it

__all__ = ["ERROR", "FLAGGED", "OK", "CheckError", "add_arguments", "run_check"]


#: --dtype's names -> the torch dtype's name
DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
}


class CheckError(Exception):
    """The model could not be checked; exit status 2 with this message."""


# ------------------------------------------------------------------ argument types
def parse_shape(text: str) -> tuple[int, ...]:
    """``"32,3,32,32"`` (or ``32x3x32x32``) -> ``(32, 3, 32, 32)``; every size a positive integer."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive integers such as 32,3,32,32; got {text!r}")
    return shape


def parse_dtype(text: str) -> str:
    """``--dtype``: the name of a torch dtype (``"long"`` -> ``"int64"``), resolved once torch is imported."""
    key = text.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_seed(text: str) -> int:
    """``--seed``: an integer that torch's generators take, 0 <= seed < 2**63."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63-1; got {text!r}")
    return seed


#: --precision's names, each with the check(precision=) formats it stands for
_PRECISIONS = {"fp16": ("float16",), "float16": ("float16",), "half": ("float16",), "bf16": ("bfloat16",),
               "bfloat16": ("bfloat16",), "fp8": ("float8_e4m3fn", "float8_e5m2"), "e4m3": ("float8_e4m3fn",),
               "float8_e4m3fn": ("float8_e4m3fn",), "e5m2": ("float8_e5m2",), "float8_e5m2": ("float8_e5m2",)}


def parse_precisions(text: str) -> list[str]:
    """``--precision fp16,bf16,fp8`` -> the formats, in order, each once."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in _PRECISIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(_PRECISIONS)}; got {text!r}")
    return list(dict.fromkeys(f for p in names for f in _PRECISIONS[p]))


def parse_problems(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in STATUSES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(STATUSES)}; got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="a dotted module importable from the current directory, or a path to a .py file, then"
                             " ':' and a callable in it returning an nn.Module (e.g. models:make_resnet)")
    parser.add_argument("--input-shape", type=parse_shape, action="append", required=True, metavar="SHAPE",
                        help="shape of the random input, comma-separated (e.g. 32,3,32,32); repeat it for a model"
                             " that takes several inputs")
    parser.add_argument("--dtype", type=parse_dtype, action="append", default=None, metavar="DTYPE",
                        help="dtype of the input (default float32); once for every input, or once per"
                             " --input-shape. Integer dtypes (int64 for token ids) need --int-high")
    parser.add_argument("--int-high", type=int, default=None, metavar="N",
                        help="integer inputs are drawn uniformly from [0, N) (e.g. the vocabulary size)")
    parser.add_argument("--config", default=None, metavar="YAML", help="a torchdiag config file (thresholds...)")
    parser.add_argument("--seed", type=parse_seed, default=0,
                        help="seed of the factory and of the input, from 0 to 2**63-1 (default 0)")
    parser.add_argument("--device", default="cpu",
                        help="run the model there (default cpu); one this PyTorch build cannot use exits 2")
    parser.add_argument("--precision", type=parse_precisions, default=None, metavar="FORMATS",
                        help="also measure every layer's outputs and gradients against these formats, comma-separated"
                             " (fp16, bf16: the forward under torch.autocast in that dtype; fp8: float8_e4m3fn and"
                             " float8_e5m2 with one scale per tensor): the headroom to overflow and the share of"
                             " values under the format's precision floor, per layer, and the precision problems")
    parser.add_argument("--fail-on", type=parse_problems, default=None, metavar="PROBLEMS",
                        help=f"exit 1 only for these problems, comma-separated, from: {', '.join(STATUSES)}"
                             " (default: any)")


# ------------------------------------------------------------------ loading
def load_factory(target: str) -> tuple[object, str]:
    """``MODULE:FACTORY`` -> (the object named FACTORY, a description). Raises ``CheckError``."""
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise CheckError(f"expected MODULE:FACTORY (e.g. models:make_model or path/to/models.py:make_model),"
                         f" got {target!r}")
    module = _import(module_part)
    obj: object = module
    for name in attr.split("."):
        if not hasattr(obj, name):
            where = getattr(module, "__file__", None) or module_part
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise CheckError(f"{module_part!r} ({where}) has no attribute {attr!r}; it has: "
                             f"{', '.join(public[:30])}{' ...' if len(public) > 30 else ''}")
        obj = getattr(obj, name)
    return obj, f"{module_part}:{attr}"


def _import(spec: str) -> types.ModuleType:
    looks_like_path = spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)
    if looks_like_path:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise CheckError(f"cannot import {spec!r}: no such file")
        parent = str(path.parent)
        if parent not in sys.path:
            sys.path.insert(0, parent)  # so that the file's own imports of its neighbours work
        name = f"_torchdiag_check_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise CheckError(f"cannot import {spec!r}: not a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SyntaxError, ImportError, whatever the file raises (SystemExit included)
            sys.modules.pop(name, None)
            raise CheckError(f"cannot import {spec!r}: {type(e).__name__}: {e}") from e
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(spec)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # ImportError, and whatever the module itself raises (SystemExit included)
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name and spec.startswith(e.name):
            hint = f" (looked in the current directory {cwd} and on sys.path; or give a path: path/to/file.py)"
        raise CheckError(f"cannot import {spec!r}: {type(e).__name__}: {e}{hint}") from e


def build_model(obj: object, what: str) -> nn.Module:
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CheckError(f"{what} is not callable (it is of type {type(obj).__name__}); expected a function or class"
                         " returning an nn.Module, or an nn.Module")
    try:
        model = obj()
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise CheckError(f"{what}() raised {type(e).__name__}: {e} (the factory is called with no arguments)") from e
    if not isinstance(model, nn.Module):
        raise CheckError(f"{what}() returned an object of type {type(model).__name__}, not a torch.nn.Module")
    return model


def make_inputs(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype | str] | None, int_high: int | None,
                seed: int, device: str) -> list[torch.Tensor]:
    import torch

    kinds: list[torch.dtype] = [torch.float32] if dtypes is None else [
        getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
    if len(kinds) == 1:
        kinds = kinds * len(shapes)
    if len(kinds) != len(shapes):
        raise CheckError(f"give --dtype once, or once per --input-shape ({len(shapes)}); got {len(kinds)}")
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for shape, dtype in zip(shapes, kinds):
        if not dtype.is_floating_point and dtype != torch.bool:
            if int_high is None:
                raise CheckError(f"an integer input ({str(dtype).removeprefix('torch.')}) needs --int-high N: values"
                                 " are drawn from [0, N), e.g. N = the vocabulary size")
            if int_high < 1:
                raise CheckError(f"--int-high must be >= 1, got {int_high}")
        try:
            if dtype.is_floating_point:
                x = torch.randn(shape, generator=gen).to(dtype)
            elif dtype == torch.bool:
                x = torch.randint(0, 2, shape, generator=gen).bool()
            else:
                assert int_high is not None  # checked above for every integer dtype
                x = torch.randint(0, int_high, shape, generator=gen, dtype=torch.int64).to(dtype)
        except (RuntimeError, MemoryError, OverflowError) as e:  # torch's allocator: "can't allocate memory"
            n = math.prod(shape)
            size = n * dtype.itemsize
            why = (f"{size / 2 ** 30:,.1f} GiB of {str(dtype).removeprefix('torch.')}" if "allocate" in str(e)
                   or isinstance(e, MemoryError) else f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            raise CheckError(f"--input-shape {','.join(map(str, shape))}: cannot allocate an input of {n:,} elements"
                             f" ({why})") from e
        inputs.append(x)
    try:
        return [x.to(device) for x in inputs]
    except Exception as e:  # noqa: BLE001 - AssertionError ("Torch not compiled with CUDA enabled") included
        raise CheckError(f"--device {device!r}: {e}") from e


def check_device(text: str) -> str:
    """``--device``: a device this PyTorch build can use, else ``CheckError`` (one line, exit 2)."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise CheckError(f"--device {text!r} is not a device name: {str(e).splitlines()[0]}") from e
    if device.type == "meta":
        raise CheckError(f"--device {text!r}: tensors on the meta device hold no values, so there is nothing to check;"
                         " use --device cpu (or cuda)")
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        built = f"this PyTorch {torch.__version__} has no {device.type} support"
        if device.type == "cuda" and torch.version.cuda is not None or device.type != "cuda" and _built(device.type):
            built = f"no {device.type} device is available to this PyTorch {torch.__version__}"
        raise CheckError(f"--device {text!r}: {built} (torch.{device.type}.is_available() is False); try --device cpu")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise CheckError(f"--device {text!r}: there are {count()} {device.type} device(s), numbered from 0")
    return text


def _built(kind: str) -> bool:
    """Whether this PyTorch build was compiled with ``kind`` support (best effort)."""
    import torch
    for probe in (getattr(getattr(torch.backends, kind, None), "is_built", None),
                  getattr(getattr(torch, kind, None), "_is_compiled", None)):
        if callable(probe):
            try:
                return bool(probe())
            except Exception:  # noqa: BLE001, S112 - a probe that fails says nothing
                continue
    return False


def _ids_hint(model: nn.Module, inputs: Sequence[torch.Tensor], error: BaseException) -> str | None:
    """The one-line hint for an Embedding fed floats (torch: "Expected tensor for argument #1 'indices' to have one
    of the following scalar types: Long, Int"), or None when the error is another."""
    from torch import nn

    text = str(error)
    if "'indices'" not in text or "Long" not in text or not any(x.is_floating_point() for x in inputs):
        return None
    emb = next(((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))), None)
    where, high = (f"its {type(emb[1]).__name__} '{emb[0]}'", emb[1].num_embeddings) if emb else ("an embedding",
                                                                                                   None)
    return (f"{where} takes integer ids, not floats: pass --dtype int64 --int-high N (ids are drawn from [0, N)"
            + (f", e.g. --int-high {high}, its number of embeddings)" if high else ", N = the vocabulary size)"))


def _describe(inputs: Iterable[torch.Tensor]) -> str:
    return ", ".join(f"({','.join(map(str, x.shape))}) {str(x.dtype).removeprefix('torch.')}" for x in inputs)


# ------------------------------------------------------------------ command
def run_check(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``torchdiag check`` with parsed arguments; return the exit status (0, 1 or 2)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        report, header, model, shapes = _check(args)
    except CheckError as e:
        print(f"torchdiag check: {e}", file=err)
        return ERROR
    fail = set(STATUSES) if args.fail_on is None else set(args.fail_on)
    from .._checks.check_table import render_check

    print(header, file=out)
    print(render_check(report, model, shapes, color=use_color(out)), file=out)
    found = {p for layer in report.flagged for p in layer.status}
    for fmt in args.precision or ():
        try:
            ranged = _check_precision(args, model, fmt)
        except CheckError as e:
            print(f"torchdiag check: {e}", file=err)
            return ERROR
        from .._checks.check_table import range_table

        print(f"\nprecision {fmt}:", file=out)
        print("\n".join(range_table(ranged)), file=out)
        for layer in ranged.layers:
            for f in layer.findings:
                if f.problem in ("overflow_risk", "underflow"):
                    print(f"! {f.message}", file=out)
        precision_found = {p for layer in ranged.flagged for p in layer.status if p in ("overflow_risk", "underflow")}
        print(f"{fmt}: " + (", ".join(sorted(precision_found)) if precision_found else "fits"), file=out)
        found |= precision_found
    verdict = decide(found, fail, verb="flagged")
    print(verdict.line, file=out)  # "OK: nothing flagged" too, as summarize's "OK: nothing found in the run"
    return verdict.status


def _check_precision(args: argparse.Namespace, model: nn.Module, fmt: str) -> Report:
    """``check(precision=fmt)`` on the same model and the same input (drawn again from the seed)."""
    from .._checks.checking import check
    from ..config import resolve_config

    inputs = make_inputs(args.input_shape, args.dtype, args.int_high, args.seed, args.device)
    config = resolve_config(args.config) if args.config is not None else None
    try:
        return check(model, *inputs, config=config, precision=fmt)
    except Exception as e:  # noqa: BLE001 - whatever the model raises under autocast: exit 2, not a traceback
        raise CheckError(f"--precision {fmt}: {type(e).__name__}: {e}") from e


def _check(args: argparse.Namespace) -> tuple[Report, str, nn.Module, dict[str, str]]:
    import torch

    from .._checks.check_table import ShapeRecorder
    from .._checks.checking import check
    from ..config import resolve_config
    from ..errors import ConfigError

    try:
        config = resolve_config(args.config) if args.config is not None else None
    except ConfigError as e:
        raise CheckError(str(e)) from e
    check_device(args.device)
    obj, what = load_factory(args.target)
    torch.manual_seed(args.seed)
    model = build_model(obj, what)
    inputs = make_inputs(args.input_shape, args.dtype, args.int_high, args.seed, args.device)
    try:
        model = model.to(args.device)
    except Exception as e:  # noqa: BLE001 - whatever the move raises: exit 2, not a traceback
        raise CheckError(f"--device {args.device!r}: cannot move the model there: {e}") from e
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    mismatch = any(x.is_floating_point() and x.dtype not in params for x in inputs) and bool(params)
    try:
        with ShapeRecorder(model) as rec:
            report = check(model, *inputs, config=config)
    except Exception as e:  # noqa: BLE001 - a model that fails in backward, or a bad loss: exit 2, not a traceback
        what_failed = f"{type(model).__name__} on input {_describe(inputs)}"
        ids = _ids_hint(model, inputs, e)
        if ids is not None:  # an Embedding fed floats: the fix, in one line
            raise CheckError(f"{what_failed}: {ids}") from e
        if isinstance(e, TorchDiagError):
            hint = (f" (the model's parameters are {', '.join(sorted(str(d).removeprefix('torch.') for d in params))})"
                    if mismatch else "")
            raise CheckError(f"{what_failed}: {e}{hint}") from e
        raise CheckError(f"{what_failed}: {type(e).__name__}: {e}") from e
    n_params = sum(p.numel() for p in model.parameters())
    header = (f"torchdiag check {what}: {type(model).__name__} ({n_params:,} parameters), input {_describe(inputs)},"
              f" seed {args.seed}")
    return report, header, model, rec.shapes
