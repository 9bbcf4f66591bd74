"""工具插件 / Tool plug-ins, in upstream ChatGLM3's convention (tools_using_demo/tool_register.py).

A tool file is a Python file whose functions are decorated with `register_tool`::

    from typing import Annotated
    from chatglm3 import register_tool

    @register_tool
    def get_weather(city: Annotated[str, "城市名，例如 北京", True]) -> dict:
        \"\"\"查询城市的天气\"\"\"
        ...

The function's name is the tool's name, its docstring the description, and each parameter's
`Annotated[type, description, required]` (required may be left out: then a parameter without a default is
required) its entry in the schema the model sees, in the form the training data and the chat format use for tools:
{"name", "description", "parameters": {"type": "object", "properties": {name: {"type", "description"}},
"required": [...]}}. A tool may return a str (the observation as is) or any JSON value (written as JSON).
`register_metrics` marks a function `f(records) -> {key: number}` that evaluate.py --tools adds to its summary
(records: the lines of its predictions file), for what only the tool's own side knows how to check.

`load_tool_files` imports tool files by path (their folder is put at the end of sys.path, so they may import
modules beside them); every problem with a file is one ChatGLMError line naming it (and the line where known).
The calls themselves are executed by chatglm3.serving.tool_loop, the one path for every tool.
"""
import importlib.util
import inspect
import json
import sys
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from chatglm3.errors import ChatGLMError
from chatglm3.output_files import refuse_device_inputs

_TOOL_ATTR = "__chatglm3_tool__"
_METRICS_ATTR = "__chatglm3_metrics__"
# Python types -> the JSON Schema names the tool lists of the training data use.
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", tuple: "array",
              dict: "object"}
_registered: List["Tool"] = []  # every registration, in order: a file's duplicates are found in its slice


class ToolFileError(ChatGLMError):
    """A tool file that cannot be used; the message is one line naming the file (and line)."""


@dataclass(frozen=True)
class Param:
    name: str
    json_type: str
    description: str
    required: bool
    as_tuple: bool = False  # annotated as a tuple: the call's list is passed as one

    def accepts(self, value) -> bool:
        if isinstance(value, bool):  # bool is an int to Python, not to JSON
            return self.json_type == "boolean"
        expected = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
                    "object": dict}[self.json_type]
        return isinstance(value, expected)


@dataclass
class Tool:
    """A registered function with the schema derived from its signature."""
    name: str
    description: str
    params: Tuple[Param, ...]
    function: Callable
    where: str  # "file:line" of its definition

    @property
    def schema(self) -> dict:
        return {"name": self.name, "description": self.description,
                "parameters": {"type": "object",
                               "properties": {p.name: {"type": p.json_type, "description": p.description}
                                              for p in self.params},
                               "required": [p.name for p in self.params if p.required]}}

    def argument_problem(self, arguments) -> Optional[str]:
        """Why the call's arguments do not fit the signature (model-facing, so Chinese, as the training data's
        observations), or None."""
        known = {p.name: p for p in self.params}
        fits = (isinstance(arguments, dict) and set(arguments) <= set(known)
                and all(p.name in arguments for p in self.params if p.required)
                and all(known[k].accepts(v) for k, v in arguments.items()))
        if fits:
            return None
        shown = json.dumps(arguments, ensure_ascii=False, default=repr)
        if not self.params:
            return f"这个工具不需要参数，收到：{shown}"
        spec = "、".join(f"{p.name}（{p.json_type}{'' if p.required else '，可不填'}：{p.description}）"
                        for p in self.params)
        return f"参数应为 {spec}，收到：{shown}"

    def run(self, arguments: dict):
        """Call the function with arguments that passed argument_problem."""
        known = {p.name: p for p in self.params}
        return self.function(**{k: tuple(v) if known[k].as_tuple else v for k, v in arguments.items()})


def _where(function) -> Tuple[str, int]:
    code = getattr(function, "__code__", None)
    return (code.co_filename, code.co_firstlineno) if code else ("?", 0)


def _bad(function, zh: str, en: str) -> ToolFileError:
    path, line = _where(function)
    name = getattr(function, "__name__", repr(function))
    return ToolFileError(f"错误：{path} 第 {line} 行，工具 {name}：{zh} / Error: {path} line {line}, tool {name}: {en}")


def _json_type(function, name: str, annotation) -> Tuple[str, bool]:
    origin = typing.get_origin(annotation) or annotation
    if origin not in JSON_TYPES:
        raise _bad(function, f"参数 {name} 的类型 {annotation!r} 不受支持，请用 str、int、float、bool、list、tuple 或 dict",
                   f"parameter {name!r}: type {annotation!r} is not supported; use str, int, float, bool, list, "
                   f"tuple or dict")
    return JSON_TYPES[origin], origin is tuple


def _params(function) -> Tuple[Param, ...]:
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception as exc:  # an annotation that names nothing (NameError) and the like
        raise _bad(function, f"无法解析参数注解（{type(exc).__name__}: {exc}）",
                   f"cannot resolve its annotations ({type(exc).__name__}: {exc})") from None
    params = []
    for p in inspect.signature(function).parameters.values():
        usage = f"{p.name}: Annotated[str, \"说明 / description\", True]"
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise _bad(function, f"参数 {p.name} 必须是普通的具名参数（不支持 *args、**kwargs、仅位置参数）",
                       f"parameter {p.name!r} must be a named parameter (no *args, **kwargs or positional-only)")
        hint = hints.get(p.name)
        metadata = getattr(hint, "__metadata__", ())
        if hint is None or not metadata or not isinstance(metadata[0], str) or not metadata[0].strip():
            raise _bad(function, f"参数 {p.name} 需要 Annotated 注解和说明，例如 {usage}",
                       f"parameter {p.name!r} needs an Annotated annotation with a description, e.g. {usage}")
        required = metadata[1] if len(metadata) > 1 else p.default is p.empty
        if not isinstance(required, bool) or len(metadata) > 2:
            raise _bad(function, f"参数 {p.name} 的 Annotated 应为 [类型, 说明, 是否必填 True/False]",
                       f"parameter {p.name!r}: Annotated takes [type, description, required True/False]")
        if not required and p.default is p.empty:
            raise _bad(function, f"参数 {p.name} 不是必填的，需要默认值", f"parameter {p.name!r} is not required, so "
                                                                  f"it needs a default value")
        json_type, as_tuple = _json_type(function, p.name, hint.__origin__)
        params.append(Param(p.name, json_type, metadata[0].strip(), required, as_tuple))
    return tuple(params)


def register_tool(function: Callable) -> Callable:
    """Decorator: offer `function` as a tool (module doc). Returns the function unchanged; a function that breaks
    the convention raises ToolFileError naming its file and line."""
    if not inspect.isfunction(function):
        raise ToolFileError(f"错误：register_tool 只能装饰函数，收到 {function!r} / Error: register_tool decorates "
                            f"functions, got {function!r}")
    description = inspect.getdoc(function)
    if not description:
        raise _bad(function, "缺少文档字符串（模型看到的工具说明）", "no docstring (the description the model reads)")
    path, line = _where(function)
    tool = Tool(function.__name__, description, _params(function), function, f"{path}:{line}")
    setattr(function, _TOOL_ATTR, tool)
    _registered.append(tool)
    return function


def register_metrics(function: Callable) -> Callable:
    """Decorator: `function(records) -> {key: number or None}` adds keys to evaluate.py --tools's summary."""
    if not inspect.isfunction(function):
        raise ToolFileError(f"错误：register_metrics 只能装饰函数，收到 {function!r} / Error: register_metrics decorates "
                            f"functions, got {function!r}")
    setattr(function, _METRICS_ATTR, True)
    return function


def tool_of(function) -> Optional[Tool]:
    """The Tool a function was registered as (None when it was not)."""
    return getattr(function, _TOOL_ATTR, None)


@dataclass
class ToolFiles:
    """What some tool files offer: the tools by name, in file order, and their metric functions."""
    tools: Dict[str, Tool] = field(default_factory=dict)
    metrics: List[Callable] = field(default_factory=list)

    @property
    def schemas(self) -> List[dict]:
        return [tool.schema for tool in self.tools.values()]


def _import_error(path: Path, exc: BaseException) -> ToolFileError:
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == path:
        line = exc.lineno
    else:  # the last line of the tool file the error passed through
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
        line = frames[-1].lineno if frames else None
    at_zh, at_en = (f" 第 {line} 行", f" line {line}") if line else ("", "")
    reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return ToolFileError(f"错误：无法导入工具文件 {path}{at_zh}（{reason}）/ Error: cannot import the tool file "
                         f"{path}{at_en} ({reason})")


def _import(path: Path, index: int):
    name = f"_chatglm3_tool_file_{index}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    if folder not in sys.path:  # modules beside the tool file can be imported; nothing already importable is shadowed
        sys.path.append(folder)
    sys.modules[name] = module  # as an import would (dataclasses, pickle look the module up)
    try:
        spec.loader.exec_module(module)
    except ChatGLMError:  # it already says what and where (a bad table it reads, a tool breaking the convention)
        del sys.modules[name]
        raise
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise _import_error(path, exc) from None
    return module


def load_tool_files(paths) -> ToolFiles:
    """Import each tool file; its tools are the registered functions among its globals (its own, or imported from
    another module). A missing file, one that is not .py, fails to import, defines no tool or a name twice is a
    ToolFileError."""
    found = ToolFiles()
    for index, given in enumerate(paths):
        path = Path(given).resolve()
        refuse_device_inputs({"--tools": given})  # a device would be read for ever
        if not path.is_file():
            raise ToolFileError(f"错误：找不到工具文件 {given} / Error: tool file {given} not found")
        if path.suffix != ".py":
            raise ToolFileError(f"错误：--tools 需要 Python 工具文件（.py），收到 {given}；表格等数据由工具文件自己读取，见 "
                                f"docs/tools.md / Error: --tools takes Python tool files (.py), got {given}; a tool "
                                f"file reads its own data (a table, ...), see docs/tools.md")
        start = len(_registered)
        module = _import(path, index)
        defined = {}
        for tool in _registered[start:]:  # a name defined twice in the file leaves one function in its globals
            tool_path, line = _where(tool.function)
            if Path(tool_path).resolve() != path:
                continue
            if tool.name in defined:
                raise ToolFileError(f"错误：{given} 第 {line} 行：工具名 {tool.name} 重复（第一次在第 {defined[tool.name]} 行）/ "
                                    f"Error: {given} line {line}: a second tool named {tool.name!r} (the first at line "
                                    f"{defined[tool.name]})")
            defined[tool.name] = line
        tools, metrics = [], []
        for value in vars(module).values():
            if tool_of(value) is not None and tool_of(value) not in tools:
                tools.append(tool_of(value))
            elif getattr(value, _METRICS_ATTR, False) and value not in metrics:
                metrics.append(value)
        if not tools:
            raise ToolFileError(f"错误：工具文件 {given} 没有定义任何工具（请用 @register_tool 装饰函数）/ Error: tool "
                                f"file {given} defines no tool (decorate a function with @register_tool)")
        for tool in tools:
            if tool.name in found.tools:
                raise ToolFileError(f"错误：{given} 的工具 {tool.name} 与 {found.tools[tool.name].where} 的重名 / Error: "
                                    f"tool {tool.name!r} of {given} has the name of the one at "
                                    f"{found.tools[tool.name].where}")
            found.tools[tool.name] = tool
        found.metrics += [m for m in metrics if m not in found.metrics]
    return found


def run_metrics(metrics: List[Callable], records: List[dict]) -> Dict[str, Any]:
    """The keys the metric functions add, each checked: a dict of str keys and numbers (or None)."""
    summary = {}
    for function in metrics:
        path, line = _where(function)
        where = f"{path} 第 {line} 行 {function.__name__}"
        try:
            result = function(records)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            raise ToolFileError(f"错误：指标函数 {where} 出错（{reason}）/ Error: the metric function "
                                f"{function.__name__} at {path}:{line} failed ({reason})") from None
        if not isinstance(result, dict) or not all(
                isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
                for k, v in result.items()):
            raise ToolFileError(f"错误：指标函数 {where} 应返回 {{名称: 数值}} 字典 / Error: the metric function "
                                f"{function.__name__} at {path}:{line} must return a dict of str keys and numbers")
        summary.update(result)
    return summary
