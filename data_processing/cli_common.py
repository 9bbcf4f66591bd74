"""What data_processing.py and format_tool_poke.py share: the paths, the table flags, output checks and atomic
writing (chatglm3.output_files's, the project's one) and the runner that turns a bad input into one line on stderr and
exit status 1.

The pipeline reads tables with `pokedex` (beside this file) and conversation files with the installed `chatglm3`
package's reader, as training does.
"""
import sys
from pathlib import Path

from chatglm3.errors import ChatGLMError
from chatglm3.json_files import dumps  # noqa: F401  (the scripts' one JSON writer: no bare NaN)
from chatglm3.output_files import check_outputs, write_all_atomic, write_atomic  # noqa: F401  (the one way to write)
from pokedex import COLUMN_FLAGS, COLUMNS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = REPO / "finetune_chatmodel_demo"  # where the formatted data goes by default, as upstream's scripts expect

DEFAULT_TABLE = HERE / "data.csv"
DEFAULT_CONVERSATIONS = DEMO / "formatted_data" / "pokemon_data.json"  # data_processing.py's output
DEFAULT_JSONL = DEMO / "formatted_data" / "pokemon_conversations.jsonl"  # format_tool_poke.py's output


def add_table_args(parser, zh_prefix="", en_suffix=""):
    """--encoding and one flag per column name (--name-col ...), as both scripts take them."""
    parser.add_argument("--encoding", default="auto",
                        help=f"{zh_prefix}输入编码，默认自动识别 UTF-8/GBK / input encoding{en_suffix} "
                             "(default: auto = UTF-8 or GBK)")
    for role, flag in COLUMN_FLAGS.items():
        parser.add_argument(flag, dest=f"col_{role}", metavar="NAME",
                            help=f"{zh_prefix}「{COLUMNS[role]}」列的列名 / header of the {role} column{en_suffix} "
                                 f"(default: {COLUMNS[role]})")


def table_columns(args):
    """The column names given on the command line, {role: header}."""
    return {role: getattr(args, f"col_{role}") for role in COLUMNS if getattr(args, f"col_{role}")}


def run_cli(build_parser, run, argv=None):
    """Parse argv, run, print the report; returns the exit status (0 ok, 1 bad input). Bad input gives a one-line
    message, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        lines = run(args)
    except ChatGLMError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"错误：{e.filename or ''} 读写失败：{e.strerror} / Error: cannot read or write "
              f"{e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
