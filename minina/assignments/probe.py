"""What runs in the student's kernel when an exercise is checked: call one function, watch it, report.

The checker sends a request (a notebook name, the arguments, what to observe) and gets back a reply: the output
as plain data (tensors, numbers, strings, containers; anything else only by its type name), the error the call
raised, the forbidden calls it made, and the observations asked for (the arguments after the call, gradients,
how often each submodule ran, how many keys the score saw at once). Nothing here decides a verdict: the grader
does that in its own process from the reply, and check() in a notebook uses the same functions in-process.

Forbidden calls are watched with sys.setprofile on code objects (by file and qualified name) and on builtins (by
identity), so an alias bound before the check is still seen; calls made from minina's NeuralScore (which the
exercises build on) are not counted.
"""
import base64
import io
import numbers
import sys
import threading
from pathlib import Path

import torch

import minina
from minina.scores import NeuralScore

REPLY_MARKER = "MININA-REPLY"  # the kernel prints REPLY_MARKER-<nonce> <base64 reply>; the grader reads that line
OPAQUE = "\x00minina-type"  # key of the dict standing for an object that is not plain data
SCORE = "\x00minina-score"  # key of the dict describing a NeuralScore: its constructor options and weights
_PACKAGE = Path(minina.__file__).resolve().parent
_TORCH = Path(torch.__file__).resolve().parent
_SETPROFILE, _GETPROFILE = sys.setprofile, sys.getprofile  # bound now, before any notebook code runs


def _codes():
    """label -> [(file, qualified name or None for the whole file)] of the Python code an exercise may forbid."""
    masks, attention, chunked = (str(_PACKAGE / name) for name in ("masks.py", "attention.py", "chunked.py"))
    return {
        "minina.masked_softmax": [(masks, "masked_softmax")],
        "minina.attention_bias": [(masks, "attention_bias")],
        "minina.dot_product_attention": [(attention, name) for name in
                                         ("dot_product_attention", "sdpa_attention", "attention_weights")],
        "minina.neural_attention": [(attention, name) for name in
                                    ("neural_attention", "reference_neural_attention", "triton_neural_attention")]
        + [(chunked, "chunked_neural_attention"), (chunked, "ChunkedNeuralAttention.forward")],
        "minina.triton_kernels": [(str(_PACKAGE / "triton_kernels.py"), None)],
        "minina.MultiHeadAttention": [(str(_PACKAGE / "modules.py"), "MultiHeadAttention.forward")],
        "NeuralScore.logits": [(str(_PACKAGE / "scores.py"), "NeuralScore.logits")],
        "NeuralScore.split": [(str(_PACKAGE / "scores.py"), "NeuralScore.split")],
        "nn.MultiheadAttention": [(str(_TORCH / "nn" / "modules" / "activation.py"), "MultiheadAttention.forward"),
                                  (str(_TORCH / "nn" / "functional.py"), "multi_head_attention_forward")],
        "autograd (backward or torch.autograd.grad)": [(str(_TORCH / "autograd" / "graph.py"),
                                                        "_engine_run_backward")],
    }


def _builtins():
    """label -> builtin functions: the fused attention of F and every aten SDPA op torch exposes."""
    fused = [getattr(torch, name) for name in dir(torch) if "scaled_dot_product" in name]
    return {"F.scaled_dot_product_attention": [torch._C._nn.scaled_dot_product_attention],
            "an aten scaled_dot_product op": fused}


FORBIDDABLE = (*_codes(), *_builtins())  # the labels an exercise may list in forbid=
_OPS_FILE = str(_TORCH / "_ops.py")  # torch.ops.aten.X(...) runs OpOverload(Packet).__call__ there
_ALLOWED_CALLERS = (str(_PACKAGE / "scores.py"), str(_PACKAGE / "assignments" / "exercises.py"))
_LOGITS = (str(_PACKAGE / "scores.py"), "NeuralScore.logits")


class Watch:
    """Record the forbidden calls (and, with spy=True, the key count of each NeuralScore.logits call) in a block.

    The profile hook runs on every call the student's code makes, so it does as little as it can: one set lookup
    by file name on a call, one dict lookup on a builtin call; only calls into a watched file are looked at closely.
    """

    def __init__(self, forbid, spy=False):
        unknown = set(forbid) - set(FORBIDDABLE)
        if unknown:
            raise ValueError(f"forbid names unknown calls {sorted(unknown)}; known: {FORBIDDABLE}")
        self.codes, self.files, self.builtins = {}, {}, {}
        for label, targets in _codes().items():
            for file, qualname in targets if label in forbid else ():
                (self.codes.__setitem__((file, qualname), label) if qualname else self.files.__setitem__(file, label))
        for label, functions in _builtins().items():
            self.builtins.update({function: label for function in functions} if label in forbid else {})
        self.aten = "an aten scaled_dot_product op" in forbid
        self.spy, self.hits, self.widths, self.inside = spy, [], [], []  # inside: frames of forbidden calls
        self.watched = {file for file, _ in self.codes} | set(self.files) | ({_OPS_FILE} if self.aten else set()) | (
            {_LOGITS[0]} if spy else set())  # the files whose calls _call looks at
        self._hook = self._make_hook()

    def _make_hook(self):
        watched, inside, forbidden = self.watched, self.inside, self.builtins.get
        call, c_call = self._call, self._c_call

        def hook(frame, event, arg):
            if event == "call":
                if frame.f_code.co_filename in watched:
                    call(frame)
            elif event == "return":
                if inside and frame is inside[-1]:
                    inside.pop()
            elif event == "c_call" and not inside:
                try:
                    label = forbidden(arg)
                except TypeError:  # an unhashable bound builtin
                    return
                if label:
                    c_call(frame, label)
        return hook

    def _call(self, frame):
        code = frame.f_code
        key = (code.co_filename, code.co_qualname)
        label = self.codes.get(key) or self.files.get(code.co_filename)
        if label and not (frame.f_back and frame.f_back.f_code.co_filename.startswith(_ALLOWED_CALLERS)):
            self.hits += [] if self.inside else [label]  # the outermost forbidden call only
            self.inside.append(frame)
        elif self.aten and code.co_filename == _OPS_FILE and code.co_name == "__call__":
            op = frame.f_locals.get("self")
            name = str(getattr(op, "_qualified_op_name", None) or getattr(op, "_name", ""))
            if "scaled_dot_product" in name and not self.inside:
                self.hits.append(f"torch.ops.{name.replace('::', '.')}")
        if self.spy and key == _LOGITS:
            k = frame.f_locals.get("k")
            self.widths.append(k.shape[-2] if isinstance(k, torch.Tensor) and k.dim() >= 2 else -1)

    def _c_call(self, frame, label):
        if not frame.f_code.co_filename.startswith(_ALLOWED_CALLERS):
            self.hits.append(label)

    def _active(self):
        return bool(self.codes or self.files or self.builtins or self.aten or self.spy)

    def __enter__(self):
        if self._active():
            self._previous = (_GETPROFILE(), threading.getprofile())  # a profiler the notebook runs comes back after
            _SETPROFILE(self._hook)
            threading.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        if self._active():
            if _GETPROFILE() is not self._hook:
                self.hits.append("sys.setprofile (it turned off the grader's watch)")
            _SETPROFILE(self._previous[0])
            threading.setprofile(self._previous[1])


def portable(value, depth=0):
    """value as plain data the grader can load with torch.load(weights_only=True)."""
    if isinstance(value, torch.Tensor):
        with torch._C.DisableTorchFunctionSubclass():
            return value.detach().clone().as_subclass(torch.Tensor)
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if depth < 4 and isinstance(value, (tuple, list)) and len(value) <= 1000:
        return (tuple if isinstance(value, tuple) else list)(portable(x, depth + 1) for x in value)
    if depth < 4 and isinstance(value, dict) and len(value) <= 1000 and all(
            type(key) in (str, int, float) for key in value):
        return {key: portable(x, depth + 1) for key, x in value.items()}
    if type(value) is NeuralScore:
        options = {name: getattr(value, name) for name in ("head_dim", "proj_dim", "hidden", "activation", "residual")}
        return {SCORE: options, "state": {name: portable(t) for name, t in value.state_dict().items()}}
    return {OPAQUE: type(value).__name__}


def _count_calls(module):
    """Forward hooks counting the calls of each submodule; returns (counts dict, hook handles)."""
    counts, handles = {}, []
    for name, sub in module.named_modules():
        if name:
            counts[name] = 0
            handles.append(sub.register_forward_hook(
                lambda module, inputs, output, name=name: counts.__setitem__(name, counts[name] + 1)))
    return counts, handles


def execute(function, args, kwargs, forbid=(), observe=None):
    """Call function(*args, **kwargs) under a Watch and return the reply dict (see the module docstring).

    observe: {"args": True} the arguments after the call; {"grad": (grad_output, indices)} the gradients of the
    output (its first element if a pair) for the arguments at indices; {"calls": index} how often each submodule of
    the module argument at index ran; {"widths": True} the key counts the score saw (NeuralScore.logits calls and
    its MLP's input).
    """
    observe, observed, handles = observe or {}, {}, []
    args = list(args)
    if "grad" in observe:
        for index in observe["grad"][1]:
            args[index] = args[index].detach().requires_grad_()
    if "calls" in observe:
        observed["calls"], handles = _count_calls(args[observe["calls"]])
    mlp_widths = []
    if observe.get("widths"):
        score = next(a for a in args if isinstance(a, NeuralScore))
        handles.append(score.mlp.register_forward_pre_hook(lambda m, inputs: mlp_widths.append(
            inputs[0].shape[-2] if inputs and inputs[0].dim() >= 2 else -1)))
    watch, error, output = Watch(forbid, spy=bool(observe.get("widths"))), None, None
    try:
        with watch:
            output = function(*args, **kwargs)
    except BaseException as exception:  # the student's code may raise anything, KeyboardInterrupt included
        error = {"type": type(exception).__name__, "message": str(exception)[:500],
                 "stub": isinstance(exception, NotImplementedError)
                 or "NotImplementedError" in repr(exception) + repr(exception.__cause__)}
    finally:
        for handle in handles:
            handle.remove()
    if observe.get("args"):
        observed["args"] = portable(args)
    if observe.get("widths"):
        observed["widths"] = watch.widths + mlp_widths
    if "grad" in observe and error is None:
        observed["grads"] = _gradients(output, [args[i] for i in observe["grad"][1]], observe["grad"][0])
    return {"output": portable(output), "error": error, "forbidden": sorted(set(watch.hits)), "observed": observed}


def _gradients(output, inputs, grad_output):
    """The gradients of output for inputs (None where none flows), or the error backward raised, as a string."""
    output = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(output, torch.Tensor) or not output.requires_grad or output.shape != grad_output.shape:
        return "no gradient flows from the output to the inputs"
    try:
        grads = torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
    except Exception as exception:
        return f"backward raised {type(exception).__name__}: {exception}"
    return [portable(g) for g in grads]


def encode(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Probe:
    """The grader's agent in the kernel, made before the notebook runs: answers requests on the notebook's names."""

    def __init__(self, namespace, nonce):
        self.namespace, self.marker = namespace, f"{REPLY_MARKER}-{nonce} "
        self._encode, self._execute, self._print = encode, execute, print

    def serve(self, request):
        request = torch.load(io.BytesIO(base64.b64decode(request)), weights_only=False)  # from the grader
        if request["kind"] == "names":
            reply = {name: ("missing" if name not in self.namespace else
                            "stub" if self.namespace[name] is Ellipsis else "defined") for name in request["names"]}
        elif request["kind"] == "value":
            reply = portable(self.namespace[request["name"]])
        else:
            function = self.namespace[request["name"]]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(request["seed"])
                reply = self._execute(function, request["args"], request["kwargs"], request["forbid"],
                                      request["observe"])
        self._print("\n" + self.marker + self._encode(reply), flush=True)  # on a line of its own
