"""What runs in the student's kernel when an exercise is checked: call one function, watch it, report.

The checker sends a request (a notebook name, the arguments, what to observe) and gets back a reply: the output
as plain data (tensors, numbers, strings, containers; anything else only by its type name), the error the call
raised, the forbidden calls it made, and the observations asked for (the arguments after the call, gradients,
how often each submodule ran, how many keys the score saw at once). Nothing here decides a verdict: the grader
does that in its own process from the reply, and check() in a notebook uses the same functions in-process.

Forbidden calls are watched with sys.setprofile, by identity: Python code by its code objects, resolved from the
function objects (so code compiled under a minina file name is not minina's, and an alias bound before the check is
still seen), builtins (the fused attention, aten's `_op` entry points, autograd's engine) by the objects called.
Calls made from minina's NeuralScore (which the exercises build on) are not counted. The watch stays on until the
output is plain data, so nothing computes lazily after it; starting a thread or changing the profile hook while
it is on is itself a forbidden call. It is the second line: the grader first judges the source (rules.py), which
is what stops minina's source re-exec'd under another name, and code that turns the watch off before it starts.
"""
import base64
import io
import numbers
import re
import sys
import sysconfig
import threading
import types
from pathlib import Path

import torch

import minina
from minina.scores import NeuralScore

REPLY_MARKER = "MININA-REPLY"  # the kernel prints REPLY_MARKER-<nonce> <base64 reply>; the grader reads that line
OPAQUE = "\x00minina-type"  # key of the dict standing for an object that is not plain data
SCORE = "\x00minina-score"  # key of the dict describing a NeuralScore: its constructor options and weights
AUTOGRAD = "autograd (backward or torch.autograd.grad)"
ATEN = "an aten scaled_dot_product op"
_SETPROFILE, _GETPROFILE = sys.setprofile, sys.getprofile  # bound now, before any notebook code runs
_ENGINE = torch.autograd.Variable._execution_engine  # run_backward on it is every backward pass
_STUB = re.compile(r"^A\d+\.\w+$")  # the message of a stub's NotImplementedError: the exercise id
_INTERNALS = ("minina.chunked", "minina.tiles", "minina.triton_kernels", "minina.assignments.exercises",
              "minina.assignments.checks")  # minina code that computes the exercises' answers


def _code_objects(*objects):
    """The code objects of functions, of the methods of classes and of what modules define (nested code too)."""
    codes, stack = [], list(objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, types.ModuleType):
            stack += [value for value in vars(obj).values() if getattr(value, "__module__", None) == obj.__name__]
        elif isinstance(obj, type):
            stack += [value for value in vars(obj).values() if isinstance(value, (types.FunctionType, staticmethod,
                                                                                  classmethod, property))]
        elif isinstance(obj, (staticmethod, classmethod)):
            stack.append(obj.__func__)
        elif isinstance(obj, property):
            stack += [f for f in (obj.fget, obj.fset, obj.fdel) if f]
        elif isinstance(obj, types.CodeType):
            codes.append(obj)
            stack += [const for const in obj.co_consts if isinstance(const, types.CodeType)]
        elif hasattr(obj, "__code__"):
            stack.append(obj.__code__)
        elif hasattr(obj, "fn") and hasattr(obj.fn, "__code__"):  # a triton.jit kernel
            stack.append(obj.fn.__code__)
    return codes


def _modules(*names):
    """The modules of names imported so far (importing minina.triton_kernels here would import Triton before the
    notebook chose its interpreter); one imported while a watch is on is a forbidden call (see Watch.__exit__)."""
    return [sys.modules[name] for name in names if name in sys.modules]


def _codes():
    """label -> the code objects of the Python functions an exercise may forbid."""
    from minina import attention, chunked, masks, modules, tiles

    forward_mode = [getattr(torch.func, name) for name in dir(torch.func) if not name.startswith("_")]
    return {
        "minina.masked_softmax": _code_objects(masks.masked_softmax),
        "minina.attention_bias": _code_objects(masks.attention_bias),
        "minina.dot_product_attention": _code_objects(attention.dot_product_attention, attention.sdpa_attention,
                                                      attention.attention_weights),
        "minina.neural_attention": _code_objects(attention.neural_attention, chunked, tiles),
        "minina.triton_kernels": _code_objects(*_modules("minina.triton_kernels")),
        "minina.MultiHeadAttention": _code_objects(modules.MultiHeadAttention.forward),
        "NeuralScore.logits": _code_objects(NeuralScore.logits),
        "NeuralScore.split": _code_objects(NeuralScore.split),
        "nn.MultiheadAttention": _code_objects(torch.nn.MultiheadAttention.forward,
                                               torch.nn.functional.multi_head_attention_forward),
        AUTOGRAD: _code_objects(torch.autograd.graph._engine_run_backward, torch.autograd.forward_ad,
                                *forward_mode),
    }


def _builtins():
    """label -> builtin functions: the fused attention of F, every aten SDPA op torch exposes and their `_op`s."""
    fused = [getattr(torch, name) for name in dir(torch) if "scaled_dot_product" in name]
    packets = [getattr(torch.ops.aten, name) for name in dir(torch.ops.aten) if "scaled_dot_product" in name]
    ops = [getattr(packet, overload)._op for packet in packets for overload in packet.overloads()]
    dual = [getattr(torch, name) for name in ("_make_dual", "_unpack_dual") if hasattr(torch, name)]
    return {"F.scaled_dot_product_attention": [torch._C._nn.scaled_dot_product_attention],
            ATEN: fused + ops, AUTOGRAD: dual}


FORBIDDABLE = (*_codes(), *(label for label in _builtins() if label not in _codes()))  # the labels of forbid=
_OPS_CALLS = {torch._ops.OpOverload.__call__.__code__, torch._ops.OpOverloadPacket.__call__.__code__}
_WATCH_OFF = {sys.setprofile: "sys.setprofile (it turns off the grader's watch)",
              sys.settrace: "sys.settrace (it can turn off the grader's watch)"}
_THREADS = "a new thread (the grader's watch cannot follow it; compute in the function itself)"


def _allowed_callers():
    """The code of NeuralScore's methods and of minina's own NeuralScore subclasses: their calls are not counted."""
    classes, stack = [], [NeuralScore]
    while stack:
        cls = stack.pop()
        module = sys.modules.get(cls.__module__)
        if cls.__module__.startswith("minina.") and module is not None and vars(module).get(cls.__name__) is cls:
            classes.append(cls)
        stack += cls.__subclasses__()
    return set(_code_objects(*classes))


class Watch:
    """Record the forbidden calls (and, with spy=True, the key count of each NeuralScore.logits call) in a block.

    The profile hook runs on every call the student's code makes, so it does as little as it can: one dict lookup
    by code object on a Python call, one on a builtin call (and an identity test for autograd's engine).
    """

    def __init__(self, forbid, spy=False):
        unknown = set(forbid) - set(FORBIDDABLE)
        if unknown:
            raise ValueError(f"forbid names unknown calls {sorted(unknown)}; known: {FORBIDDABLE}")
        self.codes, self.builtins, self.allowed, self.unimported = {}, {}, _allowed_callers(), {}
        for label, codes in _codes().items() if forbid else ():
            self.codes.update(dict.fromkeys(codes, label) if label in forbid else {})
        for label, functions in _builtins().items():
            self.builtins.update({function: label for function in functions} if label in forbid else {})
        if forbid:  # minina's internals, threads and the hook itself: whatever an exercise forbids
            internals = set(_code_objects(*_modules(*_INTERNALS))) - self.allowed  # not LeadingPaddingScore's
            self.unimported = {name: "minina's internals" for name in _INTERNALS if name not in sys.modules}
            if "minina.triton_kernels" in forbid and "minina.triton_kernels" not in sys.modules:
                self.unimported["minina.triton_kernels"] = "minina.triton_kernels"
            self.codes.update(dict.fromkeys(internals, "minina's internals"))
            self.builtins.update(_WATCH_OFF)
            self.builtins.update(dict.fromkeys(
                [getattr(__import__("_thread"), name) for name in ("start_new_thread", "start_joinable_thread")
                 if hasattr(__import__("_thread"), name)], _THREADS))
        self.codes.update(dict.fromkeys(_OPS_CALLS, ATEN) if ATEN in forbid else {})
        if spy:
            self.codes.setdefault(NeuralScore.logits.__code__, None)
        self.engine = AUTOGRAD in forbid
        self.forbid, self.spy, self.hits, self.widths, self.inside = forbid, spy, [], [], []
        self.grading = False  # True while the grader's own autograd runs on the output (observe grad)
        self._hook = self._make_hook()

    def _make_hook(self):
        codes, inside, forbidden, engine = self.codes, self.inside, self.builtins.get, self.engine
        call, c_call = self._call, self._c_call

        def hook(frame, event, arg):
            if event == "call":
                if frame.f_code in codes:
                    call(frame, codes[frame.f_code])
            elif event == "return":
                if inside and frame is inside[-1]:
                    inside.pop()
            elif event == "c_call" and not inside:
                try:
                    label = forbidden(arg)
                except TypeError:  # an unhashable bound builtin
                    label = None
                if label is None and engine and getattr(arg, "__self__", None) is _ENGINE:
                    label = AUTOGRAD
                if label:
                    c_call(frame, label)
        return hook

    def _call(self, frame, label):
        code = frame.f_code
        if self.spy and code is NeuralScore.logits.__code__:
            k = frame.f_locals.get("k")
            self.widths.append(k.shape[-2] if isinstance(k, torch.Tensor) and k.dim() >= 2 else -1)
        if code in _OPS_CALLS:
            op = frame.f_locals.get("self")
            name = str(getattr(op, "_qualified_op_name", None) or getattr(op, "_name", ""))
            if "scaled_dot_product" in name and not self.inside:
                self.hits.append(f"torch.ops.{name.replace('::', '.')}")
        elif label and not (frame.f_back and frame.f_back.f_code in self.allowed) and not (
                self.grading and label == AUTOGRAD):
            self.hits += [] if self.inside else [label]  # the outermost forbidden call only
            self.inside.append(frame)

    def _c_call(self, frame, label):
        if frame.f_code in self.allowed or frame.f_code in _OWN_CODES or self.grading and label == AUTOGRAD:
            return
        self.hits.append(label)

    def _active(self):
        return bool(self.forbid or self.spy)

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
            self.hits += [label for name, label in self.unimported.items() if name in sys.modules]
            _SETPROFILE(self._previous[0])
            threading.setprofile(self._previous[1])


_OWN_CODES = {Watch.__enter__.__code__, Watch.__exit__.__code__}  # the watch's own calls of setprofile


def portable(value, depth=0):
    """value as plain data the grader can load with torch.load(weights_only=True).

    Only exact tensors and containers cross: a subclass could compute its values after the watch has ended, so it
    raises a TypeError naming its type. Other objects become {OPAQUE: type name}.
    """
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        return value.detach().clone()
    for kind in (torch.Tensor, tuple, list, dict):
        if isinstance(value, kind) and type(value) is not kind:
            raise TypeError(f"the output holds a {type(value).__name__}, a subclass of {kind.__name__}: return plain "
                            f"torch.Tensor, tuple, list, dict, int, float, str, bool or None values")
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if depth < 4 and type(value) in (tuple, list) and len(value) <= 1000:
        return type(value)(portable(x, depth + 1) for x in value)
    if depth < 4 and type(value) is dict and len(value) <= 1000 and all(type(k) in (str, int, float) for k in value):
        return {key: portable(x, depth + 1) for key, x in value.items()}
    if type(value) is NeuralScore:
        options = {name: getattr(value, name) for name in ("head_dim", "proj_dim", "hidden", "activation", "residual")}
        return {SCORE: options, "state": {name: portable(t) for name, t in value.state_dict().items()}}
    return {OPAQUE: type(value).__name__}


_LIBRARY = tuple({str(Path(path).resolve()) + "/" for path in (
    *(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")),
    Path(torch.__file__).parent, Path(minina.__file__).parent)})  # where a library's code lives, not a notebook's


def is_stub(exception):
    """Whether exception is an unwritten exercise's NotImplementedError: raised by the notebook's own code (not a
    library's) with the exercise id as its message, or that error wrapped by Triton. Any other NotImplementedError
    (one deep in torch, say) is an error of the student's code."""
    if isinstance(exception, NotImplementedError) and _STUB.match(str(exception)):
        trace = exception.__traceback__
        while trace is not None and trace.tb_next is not None:
            trace = trace.tb_next
        return trace is None or not str(Path(trace.tb_frame.f_code.co_filename).resolve()).startswith(_LIBRARY)
    return any(re.search(r"NotImplementedError\(['\"]A\d+\.\w+['\"]\)", repr(error))
               for error in (exception, exception.__cause__) if error is not None)


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
    watch, error, reply = Watch(forbid, spy=bool(observe.get("widths"))), None, None
    try:
        with watch:  # on until the reply is plain data: nothing the function returns computes after it
            output = function(*args, **kwargs)
            reply = portable(output)
            if observe.get("args"):
                observed["args"] = portable(args)
            if "grad" in observe:
                watch.grading = True  # the grader's own backward pass, through the student's graph
                observed["grads"] = _gradients(output, [args[i] for i in observe["grad"][1]], observe["grad"][0])
    except BaseException as exception:  # the student's code may raise anything, KeyboardInterrupt included
        error = {"type": type(exception).__name__, "message": str(exception)[:500], "stub": is_stub(exception)}
        observed.pop("grads", None)
    finally:
        for handle in handles:
            handle.remove()
    if observe.get("widths"):
        observed["widths"] = watch.widths + mlp_widths
    return {"output": reply, "error": error, "forbidden": sorted(set(watch.hits)), "observed": observed}


def _gradients(output, inputs, grad_output):
    """The gradients of output for inputs (None where none flows), or the error backward raised, as a string."""
    output = output[0] if type(output) in (tuple, list) and output else output
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
            try:
                reply = portable(self.namespace[request["name"]])
            except TypeError:  # a subclass of a tensor or container
                reply = {OPAQUE: type(self.namespace[request["name"]]).__name__}
        else:
            function = self.namespace[request["name"]]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(request["seed"])
                reply = self._execute(function, request["args"], request["kwargs"], request["forbid"],
                                      request["observe"])
        self._print("\n" + self.marker + self._encode(reply), flush=True)  # on a line of its own
