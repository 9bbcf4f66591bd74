"""长度换算工具插件（示例）/ A length-conversion tool plug-in (the worked example of docs/tools.md).

    python finetune_chatmodel_demo/inference.py --model M --tools examples/tools/convert_length.py

Deterministic and offline: the model calls convert_length(value=3, unit='km') and gets the length in metres, feet
and miles back as the observation. An unknown unit is answered with an error observation ({"错误": ...}), which
the tool loop counts as a failed call.
"""
from typing import Annotated

from chatglm3 import register_tool

METRES = {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048, "mi": 1609.344}


@register_tool
def convert_length(value: Annotated[float, "长度的数值，例如 3", True],
                   unit: Annotated[str, "长度的单位：mm、cm、m、km、in、ft 或 mi", True]) -> dict:
    """把一个长度换算成米、英尺和英里"""
    if unit not in METRES:
        return {"错误": f"不认识的单位 {unit}，可用：{'、'.join(METRES)}"}
    metres = value * METRES[unit]
    return {"米": round(metres, 4), "英尺": round(metres / METRES["ft"], 4), "英里": round(metres / METRES["mi"], 4)}
