"""Tests of pymw_magic.cellfunc: a cell body becomes a task function.

No IPython and no workers here: the function is called in-process and
pickled/unpickled with cloudpickle the way a worker receives it.
"""

from __future__ import annotations

import linecache
import pickle
import subprocess
import sys
import textwrap
import traceback

import cloudpickle
import pytest

from pymw_magic.cellfunc import UNSET, MapError, compile_cell, parse_map, register_source

HEADER = "%%pymw --map x in xs\n"


def cell(body: str, **kw):
    return compile_cell(textwrap.dedent(body), **kw)


def roundtrip(fn):
    """What a worker gets: the function pickled by value and loaded back."""
    return pickle.loads(cloudpickle.dumps(fn))


# --- reads, assigns and the last expression ---------------------------------------

def test_last_expression_is_the_result_and_assigned_names_stay_local():
    c = cell("""
        y = x * k
        z = y + 1
        z * 2
    """, params=("x",))
    assert c.reads == ("k",)
    ns = {"k": 10, "y": "notebook y", "z": "notebook z"}
    fn = c.bind(ns)
    assert fn(3) == 62
    # Locals of the task never touch the notebook.
    assert ns["y"] == "notebook y" and ns["z"] == "notebook z"
    assert set(fn.__globals__) == {"__name__", "__builtins__", "k"}
    assert set(fn.function.__globals__) == {"__name__", "__builtins__", "k"}


def test_cell_ending_in_a_statement_returns_none():
    fn = cell("y = 1\nif y:\n    y += 1\n").bind({})
    assert fn() is None


def test_empty_cell_is_a_function_returning_none():
    assert cell("").bind({})() is None
    assert cell("# only a comment\n").bind({})() is None


def test_values_are_captured_at_bind_time_not_at_call_time():
    c = cell("data[0] + offset\n")
    ns = {"data": [1], "offset": 1}
    fn = c.bind(ns)
    ns["offset"] = 100       # a later rebinding in the notebook
    shipped = roundtrip(fn)  # the payload is what the worker sees
    assert shipped() == 2
    assert fn() == 2


def test_builtins_are_not_captured_but_a_notebook_name_shadows_them():
    c = cell("len(xs), max(xs)\n")
    fn = c.bind({"xs": [1, 5]})
    assert fn() == (2, 5)
    assert "len" not in fn.__globals__
    shadowed = c.bind({"xs": [1, 5], "max": lambda v: "mine"})
    assert shadowed() == (2, "mine")


def test_names_read_by_nested_scopes_are_captured():
    c = cell("""
        def helper(v):
            return scale * v
        total = sum(helper(i) for i in range(n))
        [offset + t for t in (total,)][0]
    """)
    assert set(c.reads) >= {"scale", "n", "offset"}
    assert "helper" not in c.reads and "total" not in c.reads
    fn = roundtrip(c.bind({"scale": 2, "n": 3, "offset": 1}))
    assert fn() == 7


def test_class_body_reads_travel_with_the_function():
    # cloudpickle ships LOAD_GLOBAL names only; a class body reads with
    # LOAD_NAME, so this fails unless cellfunc makes the name travel.
    c = cell("""
        class Model:
            factor = base * 2
            doubled = factor * 2
        Model.doubled
    """)
    assert "base" in c.reads and "factor" not in c.reads
    fn = c.bind({"base": 5})
    linecache.cache.pop(c.filename, None)
    assert roundtrip(fn)() == 20


def test_a_name_defined_nowhere_is_a_name_error_naming_it():
    c = cell("y = 1\nif y:\n    y = undefined_thing + 1\ny\n")
    with pytest.raises(NameError) as info:
        c.bind({})
    assert info.value.name == "undefined_thing"
    assert "'undefined_thing'" in str(info.value)
    assert c.read_lines["undefined_thing"] == 3


def test_several_missing_names_are_all_named():
    with pytest.raises(NameError) as info:
        cell("a + b + len(c)\n").bind({"b": 1})
    assert "'a'" in str(info.value) and "'c'" in str(info.value)
    assert "'b'" not in str(info.value)


def test_names_the_cell_makes_global_are_not_required():
    fn = cell("global counter\ncounter = 3\ncounter + 1\n").bind({})
    assert fn() == 4


def test_kernel_only_builtins_are_captured_by_value(monkeypatch):
    import builtins

    def display(*a):  # what IPython adds to the kernel's builtins
        return "shown"
    display.__module__ = "IPython.core.display_functions"
    monkeypatch.setattr(builtins, "display", display, raising=False)
    fn = cell("display(1)\n").bind({})
    assert fn.__globals__["display"] is display


# --- the function is a __main__ function, pickled by value --------------------------

def test_function_is_pickled_by_value_and_runs_in_a_fresh_interpreter():
    c = cell("""
        import math
        y = math.sqrt(x) * factor
        print('task', x)
        y
    """, params=("x",), filename="<pymw-cell-9>", prefix=HEADER)
    fn = c.bind({"factor": 3.0})
    assert fn.function.__module__ == "__main__" and fn.__name__ == "<cell>"
    assert fn.__qualname__ == "<cell>"
    data = cloudpickle.dumps(fn)
    code = ("import pickle, sys; fn = pickle.loads(sys.stdin.buffer.read()); "
            "print(repr(fn(16.0)))")
    proc = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == ["task 16.0", "12.0"]


def test_remote_traceback_shows_the_cells_line_numbers_and_source():
    # In a fresh interpreter (a worker), the cell's text is not in linecache
    # until the function is unpickled: the traceback must still show it.
    c = cell("""
        a = 1
        b = a / x
        b
    """, params=("x",), filename="<pymw-cell-12>", prefix=HEADER)
    data = cloudpickle.dumps(c.bind({}))
    code = ("import pickle, sys, traceback\nfn = pickle.loads(sys.stdin.buffer.read())\n"
            "try:\n    fn(0)\nexcept Exception:\n    traceback.print_exc(file=sys.stdout)\n")
    proc = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=60)
    out = proc.stdout.decode()
    # Line 1 is the %%pymw line, the dedent's blank first line is 2, "b = a / x" is 4.
    assert 'File "<pymw-cell-12>", line 4, in <cell>' in out
    assert "b = a / x" in out
    assert "ZeroDivisionError" in out
    assert "<dynamic-code>" not in out


def test_nested_functions_of_the_cell_keep_its_filename_remotely():
    c = cell("""
        def inner(v):
            return 1 / v
        inner(x)
    """, params=("x",), filename="<pymw-cell-14>", prefix=HEADER)
    fn = roundtrip(c.bind({}))
    with pytest.raises(ZeroDivisionError) as info:
        fn(0)
    frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-2:] == [("<pymw-cell-14>", 5, "<cell>"), ("<pymw-cell-14>", 4, "inner")]


def test_local_traceback_line_numbers_match_the_cell():
    c = compile_cell("a = 1\nraise ValueError('boom')\n", filename="<pymw-cell-13>",
                     prefix="%%pymw\n")
    fn = c.bind({})
    with pytest.raises(ValueError) as info:
        fn()
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (frame.filename, frame.lineno, frame.name) == ("<pymw-cell-13>", 3, "<cell>")
    assert frame.line == "raise ValueError('boom')"


# --- syntax errors -----------------------------------------------------------------

def test_syntax_error_points_at_the_cells_own_line():
    with pytest.raises(SyntaxError) as info:
        compile_cell("a = 1\nb = (1,\n", filename="<pymw-cell-3>", prefix="%%pymw\n")
    assert info.value.filename == "<pymw-cell-3>"
    assert info.value.lineno == 3
    assert info.value.text.strip() == "b = (1,"


@pytest.mark.parametrize("body, message", [
    ("x = 1\nreturn x\n", "'return' outside function"),
    ("for i in range(3):\n    yield i\n", "'yield' outside function"),
])
def test_return_and_yield_are_rejected_like_in_a_notebook_cell(body, message):
    with pytest.raises(SyntaxError) as info:
        compile_cell(body, filename="<pymw-cell-4>", prefix="%%pymw\n")
    assert info.value.msg == message
    assert info.value.lineno == 3


def test_return_and_yield_in_nested_functions_are_fine():
    fn = cell("""
        def gen(n):
            yield from range(n)
        def f(v):
            return v + 1
        class C:
            def m(self):
                return 5
        sum(gen(3)) + f(1) + C().m() + (lambda: 1)()
    """).bind({})
    assert fn() == 3 + 2 + 5 + 1


def test_await_outside_async_is_a_syntax_error_on_its_line():
    with pytest.raises(SyntaxError) as info:
        compile_cell("x = 1\nawait thing()\n", filename="<pymw-cell-5>", prefix="%%pymw\n")
    assert info.value.lineno == 3


def test_bad_params_are_rejected():
    with pytest.raises(ValueError):
        compile_cell("1", params=("a", "a"))
    with pytest.raises(ValueError):
        compile_cell("1", params=("class",))


def test_to_source_gives_an_equivalent_plain_def():
    c = cell("y = x + k\ny * 2\n", params=("x",))
    src = c.to_source("cell_7")
    ns = {"k": 1}
    exec(src, ns)
    assert ns["cell_7"](3) == 8
    assert src.startswith("def cell_7(x):")
    # A name read before it is assigned defaults to the module's value.
    c = cell("acc = acc + [x]\nacc\n", params=("x",))
    ns = {"acc": [0], "UNSET": UNSET}
    exec(c.to_source(), ns)
    assert ns["cell"](1) == [0, 1] and ns["acc"] == [0]


@pytest.mark.parametrize("body, calls", [
    # (the cell, {argument: what the notebook's bind() gives, or the error it raises})
    ("if x:\n    y = x * 2\ny\n", {1: 2, 0: UnboundLocalError}),
    ("for i in range(x):\n    y = i\ny\n", {3: 2, 0: UnboundLocalError}),
    ("try:\n    y = 10 // x\nexcept ZeroDivisionError:\n    pass\ny\n", {5: 2, 0: UnboundLocalError}),
    ("while x > 0:\n    y = x\n    x -= 1\ny\n", {2: 1, 0: UnboundLocalError}),
])
def test_to_source_starts_a_conditionally_assigned_name_as_bind_does(body, calls):
    c = cell(body, params=("x",))
    assert c.inherited == ("y",)
    for defined in ({}, {"y": "notebook"}):
        ns = {"UNSET": UNSET, **defined}
        exec(c.to_source("task"), ns)  # the def itself must not need y
        bound = c.bind(defined)
        for arg, expected in calls.items():
            if expected is UnboundLocalError and defined:
                expected = "notebook"  # the notebook's y is where the cell starts
            if isinstance(expected, type):
                with pytest.raises(expected):
                    bound(arg)
                with pytest.raises(expected):
                    ns["task"](arg)
            else:
                assert bound(arg) == ns["task"](arg) == expected


def test_to_source_of_a_rebound_builtin_needs_no_unset():
    c = cell("total = sum(x)\nsum = 0\ntotal + sum\n", params=("x",))
    src = c.to_source("t")
    assert src.startswith("def t(x, *, sum=sum):\n") and "UNSET" not in src
    ns: dict = {}
    exec(src, ns)
    assert ns["t"]([1, 2]) == c.bind({})([1, 2]) == 3


def test_unset_travels_to_workers_as_itself():
    assert pickle.loads(cloudpickle.dumps(UNSET)) is UNSET
    c = cell("if x:\n    y = 1\ny\n", params=("x",))
    ns = {"UNSET": UNSET, "__name__": "__main__"}
    exec(c.to_source("task"), ns)
    assert roundtrip(ns["task"])(1) == 1
    with pytest.raises(UnboundLocalError):
        roundtrip(ns["task"])(0)


def test_register_source_survives_checkcache():
    register_source("<pymw-test-src>", "a\nb")
    linecache.checkcache()
    assert linecache.getline("<pymw-test-src>", 2) == "b\n"


# --- --map TARGET in EXPR ----------------------------------------------------------

def test_parse_map_simple_name():
    spec = parse_map("x in range(3)")
    assert spec.names == ("x",) and spec.iterable == "range(3)"
    assert spec.arguments({}) == [(0,), (1,), (2,)]


def test_parse_map_tuple_and_nested_and_starred_targets():
    spec = parse_map("a, b in zip(xs, ys)")
    assert spec.names == ("a", "b")
    assert spec.arguments({"xs": [1, 2], "ys": "pq"}) == [(1, "p"), (2, "q")]
    nested = parse_map("(i, (j, *rest)) in data")
    assert nested.names == ("i", "j", "rest")
    assert nested.arguments({"data": [(1, (2, 3, 4))]}) == [(1, 2, [3, 4])]


def test_parse_map_expression_with_spaces_strings_and_conditionals():
    spec = parse_map("s in ['a b', 'c'] if flag else []")
    assert spec.arguments({"flag": True}) == [("a b",), ("c",)]
    assert spec.arguments({"flag": False}) == []


@pytest.mark.parametrize("text", [
    "x range(3)", "in range(3)", "x in", "obj.attr in xs", "d[0] in xs", "a, a in xs",
    "x in range(3): pass",
])
def test_parse_map_rejects_what_is_not_target_in_expr(text):
    with pytest.raises(ValueError):
        parse_map(text)


def test_an_item_that_does_not_unpack_is_reported_with_its_position():
    spec = parse_map("a, b in pairs")
    with pytest.raises(MapError) as info:
        spec.arguments({"pairs": [(1, 2), (1, 2, 3)]})
    assert "item 1" in str(info.value) and "(1, 2, 3)" in str(info.value)


def test_a_non_iterable_map_expression_is_a_map_error():
    with pytest.raises(MapError) as info:
        parse_map("x in 5").arguments({})
    assert "not iterable" in str(info.value)


def test_map_expression_names_come_from_the_namespace():
    with pytest.raises(NameError):
        parse_map("x in nowhere").arguments({})


# --- names read before the cell assigns them --------------------------------------

def test_a_name_read_then_assigned_starts_with_the_notebook_value():
    c = cell("data = data * 2\ndata\n")
    assert c.inherited == ("data",)
    ns = {"data": 3}
    fn = roundtrip(c.bind(ns))
    assert fn() == 6
    assert ns["data"] == 3  # the assignment stayed in the task


def test_each_call_starts_afresh_from_the_captured_value():
    c = cell("total += x\ntotal\n", params=("x",))
    fn = roundtrip(c.bind({"total": 100}))
    assert fn(1) == 101
    assert fn(2) == 102


def test_read_before_assign_in_loops_and_branches():
    c = cell("""
        for i in range(3):
            acc = acc + [i]
        if flag:
            label = 'on'
        label
    """)
    assert set(c.inherited) == {"acc", "label"}
    assert c.bind({"acc": [9], "flag": False, "label": "off"})() == "off"
    assert c.bind({"acc": [9], "flag": True, "label": "off"})() == "on"


def test_names_assigned_before_use_and_comprehension_variables_are_not_inherited():
    c = cell("""
        y = 1
        squares = [v * v for v in range(y + 2)]
        v = 0
        def f():
            return later
        later = 5
        y + v + f() + len(squares)
    """)
    assert c.inherited == ()
    assert set(c.reads) == {"range", "len"}
    assert c.bind({"v": "notebook", "later": "notebook"})() == 1 + 0 + 5 + 3


def test_a_read_before_assign_name_missing_everywhere_fails_in_the_task_as_in_python():
    fn = cell("count += 1\ncount\n").bind({})
    with pytest.raises(UnboundLocalError):
        fn()


def test_try_and_while_assignments_are_not_definite():
    c = cell("""
        try:
            value = int(text)
        except ValueError:
            pass
        n = 0
        while n < 2:
            n += 1
            last = n
        (value, last)
    """)
    assert set(c.inherited) == {"value", "last"}
    assert c.bind({"text": "x", "value": -1, "last": None})() == (-1, 2)
    assert c.bind({"text": "7", "value": -1, "last": None})() == (7, 2)


def test_del_of_a_notebook_name_starts_from_its_value():
    c = cell("tmp = tmp * 2\ndel tmp\n'gone'\n")
    assert c.inherited == ("tmp",)
    assert c.bind({"tmp": 3})() == "gone"
    only_del = cell("del tmp\n'gone'\n")
    assert only_del.inherited == ("tmp",)
    ns = {"tmp": 3}
    assert roundtrip(only_del.bind(ns))() == "gone"
    assert ns["tmp"] == 3  # the del stayed in the task
    # deleted, then read: unbound again, as in Python
    with pytest.raises(UnboundLocalError):
        cell("del tmp\ntmp\n").bind({"tmp": 3})()


def test_import_star_is_a_clear_syntax_error_on_its_line():
    with pytest.raises(SyntaxError) as info:
        compile_cell("x = 1\nfrom math import *\nsqrt(x)\n", filename="<pymw-cell-3>", prefix=HEADER)
    assert info.value.lineno == 3 and info.value.filename == "<pymw-cell-3>"
    assert "'from math import *'" in info.value.msg
    assert "import the names the cell uses" in info.value.msg
    compile_cell("from math import sqrt, pi\nsqrt(pi)\n")  # explicit names are fine


def test_with_class_reads_makes_a_plain_defs_class_body_reads_travel():
    from pymw_magic.cellfunc import with_class_reads

    ns = {"__name__": "__main__", "base": 5}
    exec("def task(x):\n    class Model:\n        factor = base * 2\n    return Model.factor + x\n", ns)
    assert "base" not in cloudpickle.loads(cloudpickle.dumps(ns["task"])).__globals__
    sent = cloudpickle.dumps(with_class_reads(ns["task"]))
    ns.pop("base")  # what the worker gets must not depend on the script's namespace
    assert pickle.loads(sent)(1) == 11
    plain = {"__name__": "__main__"}
    exec("def f(x):\n    return x\n", plain)
    assert with_class_reads(plain["f"]) is plain["f"]


def test_a_lone_starred_map_target_is_a_usage_message_not_a_syntax_error():
    from pymw_magic.cellfunc import parse_map
    with pytest.raises(ValueError, match=r"cannot be assigned.*write '\*x, in"):
        parse_map("*x in [(1, 2)]")
    assert parse_map("*x, in [(1, 2)]").names == ("x",)
